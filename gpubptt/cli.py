"""The ``gpubptt`` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import signal
import sys
import time
import warnings
from collections import deque
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from . import __version__, diagnostics, plots
from . import bench as bench_lib
from ._io import write_atomic
from ._paths import DestinationError, check_regular_file, check_writable, write_error
from .backend import available_backends, get_backend
from .environment import environment
from .errors import BackendUnavailableError, InputError
from .memory import InsufficientMemoryError, format_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batched RNNs and exact BPTT on NumPy or CuPy.")


class BackendChoice(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"gpubptt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _usage_error(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _check_plot(plot: Path | None) -> None:
    """--plot must name a .png in an existing folder, and matplotlib must import: checked before any work."""
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise _usage_error(f"--plot must name a .png file, got {str(plot)!r}")
    if not plot.parent.is_dir():
        raise _usage_error(f"--plot: folder {str(plot.parent)!r} does not exist")
    if reason := plots.plot_unavailable_reason():
        raise _usage_error(reason)


def _backend_or_exit(name: str):
    try:
        return get_backend(name)
    except (BackendUnavailableError, InputError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


# -- gpubptt info / gpubptt bench ----------------------------------------------------------------
class BenchBackendChoice(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"
    all = "all"


class InputChoice(str, Enum):
    tokens = "tokens"
    dense = "dense"


class DtypeChoice(str, Enum):
    float32 = "float32"
    float64 = "float64"


class CompareChoice(str, Enum):
    none = "none"
    torch = "torch"
    naive = "naive"


class FormatChoice(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out += _flat(item, f"{prefix}{k}[{i}].")
        else:
            out.append((f"{prefix}{k}", v))
    return out


@app.command()
def info(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to describe.")] = BackendChoice.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the backend, device, library versions, BLAS build and thread counts."""
    be = _backend_or_exit(backend.value)
    env = environment([be])
    data = {
        "gpubptt": env["versions"]["gpubptt"],
        "python": env["python"],
        "numpy": env["versions"]["numpy"],
        "backend": be.name,
        "device": be.device,
        "backend_library": f"{be.xp.__name__} {be.xp.__version__}",
        "available_backends": available_backends(),
        "machine": env["machine"],
        "versions": env["versions"],
        "blas": env["blas"],
        "threads": env["threads"],
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for k, v in _flat(data):
        typer.echo(f"{k:>32}: {'-' if v is None else v}")


def _sizes(value: str, option: str) -> list[int]:
    try:
        sizes = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{option} must be comma-separated positive ints (e.g. 16,32,64), got {value!r}")
    return sizes


def _out_path(path: Path | None, option: str) -> Path | None:
    """``path`` once a file there is known to be writable (a usage error otherwise), before any work."""
    if path is not None:
        try:
            check_writable(path, option)
        except InputError as exc:
            raise _usage_error(str(exc)) from exc
    return path


def _render(result: dict, fmt: FormatChoice) -> str:
    return bench_lib.render(result, fmt.value)


@app.command()
def bench(
    backend: Annotated[
        BenchBackendChoice, typer.Option(help="Backend to measure; 'all' runs every backend available here.")
    ] = BenchBackendChoice.auto,
    seq_lens: Annotated[
        str, typer.Option(help="Sequence lengths T of the T sweep, comma-separated.")
    ] = "16,32,64,128,256,512",
    hidden_sizes: Annotated[
        str, typer.Option(help="Hidden sizes H of the H sweep, comma-separated.")
    ] = "32,64,128,256,512,1024",
    fixed_hidden: Annotated[
        int | None, typer.Option(min=1, help="H of the T sweep (default: the middle of --hidden-sizes).")
    ] = None,
    fixed_seq_len: Annotated[
        int | None, typer.Option(min=1, help="T of the H sweep (default: the middle of --seq-lens).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B.")] = 64,
    input: Annotated[
        InputChoice, typer.Option(help="tokens: (T, B) ids, one-hot (a gather); dense: (T, B, D) floats.")
    ] = InputChoice.tokens,
    vocab: Annotated[int, typer.Option(min=1, help="Vocabulary size: D = K for tokens (dense: default D, K).")] = 256,
    input_size: Annotated[int | None, typer.Option(min=1, help="D for --input dense (default: --vocab).")] = None,
    output_size: Annotated[int | None, typer.Option(min=1, help="K, the number of classes (default: --vocab).")] = None,
    dtype: Annotated[DtypeChoice, typer.Option(help="Floating-point type.")] = DtypeChoice.float32,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before timing each configuration.")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per configuration (median reported).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the weights and data (fixed per configuration).")] = 0,
    compare: Annotated[
        CompareChoice,
        typer.Option(help="Also time a reference: torch (nn.RNN + Linear + cross_entropy) or naive (per example)."),
    ] = CompareChoice.none,
    format: Annotated[
        FormatChoice | None, typer.Option(help="Output format (default: from --output's suffix, else table).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the result to this file (atomically, in --format); the table still prints on stdout "
            "unless --quiet. Its folder is checked for writing before any work."
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a log-log PNG of time vs T and vs H here.")] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress or messages on stderr; with --output, no table on stdout."),
    ] = False,
) -> None:
    """Time forward+BPTT as T grows (at fixed H) and as H grows (at fixed T).

    Each row: median/min/IQR time, tokens/s, µs per step, GFLOP/s and efficiency vs same-shaped GEMMs.

    At the end: the fitted exponents a, b of time ∝ T^a (fixed H) and time ∝ H^b (fixed T).

    Timings whose IQR/median exceeds 10 % are marked noisy (~), and so is each exponent fitted through them.

    Results go to stdout, or to --output with the table still on stdout; messages go to stderr.

    A file that cannot be written at the end: bench says so, prints its content on stdout, and exits with 1.
    """
    Ts = _sizes(seq_lens, "--seq-lens")
    Hs = _sizes(hidden_sizes, "--hidden-sizes")
    if input is InputChoice.tokens and input_size is not None:
        raise typer.BadParameter("--input-size applies to --input dense; with tokens D = --vocab")
    output, plot = _out_path(output, "--output"), _out_path(plot, "--plot")
    if output is not None and plot is not None and output.resolve() == plot.resolve():
        raise _usage_error(f"--output and --plot name the same file {str(output)!r}; give each its own")
    if format is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        format = FormatChoice(suffix) if suffix in ("json", "csv") else FormatChoice.table

    def say(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    _check_plot(plot)
    requested = available_backends() if backend is BenchBackendChoice.all else [backend.value]
    names = list(dict.fromkeys(_backend_or_exit(name).name for name in requested))  # fails here, before any work
    if compare is CompareChoice.torch and (reason := bench_lib.torch_unavailable_reason()):
        typer.echo(f"warning: {reason}; continuing without the torch comparison", err=True)
        compare = CompareChoice.none
    cfg = bench_lib.BenchConfig(
        backends=names,
        seq_lens=Ts,
        hidden_sizes=Hs,
        batch=batch,
        input=input.value,
        D=input_size or vocab,
        K=output_size or vocab,
        dtype=dtype.value,
        warmup=warmup,
        repeats=repeats,
        seed=seed,
        compare=compare.value,
        fixed_T=fixed_seq_len,
        fixed_H=fixed_hidden,
    )
    say(f"gpubptt bench: backends {', '.join(names)}; T in {Ts} at H={cfg.fixed_H}, H in {Hs} at T={cfg.fixed_T}")
    argv = ["gpubptt", *sys.argv[1:]]
    if sys.stderr.isatty() and not quiet:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("bench", total=None)

            def progress(desc: str, done: int, total: int) -> None:
                bar.update(task, description=desc, completed=done, total=total)

            result = bench_lib.run_bench(cfg, progress=progress, argv=argv)
    else:
        result = bench_lib.run_bench(cfg, argv=argv)
    for note in result["notes"]:
        say(f"note: {note}")
    failed: list[str] = []  # a file that cannot be written now must not lose the run
    if output is not None:
        text = _render(result, format)
        try:
            write_atomic(output, text)
        except OSError as exc:
            typer.echo(text, nl=False)  # what the file would have held, so the results survive
            failed.append(
                f"--output: could not write {str(output)!r} ({exc.strerror or exc}); it is as it was, "
                f"and its {format.value} content is on stdout instead"
            )
        else:
            say(f"wrote {output}")
            if not quiet:
                typer.echo(bench_lib.render_table(result), nl=False)
    else:
        typer.echo(_render(result, format), nl=False)
    if plot is not None:
        try:
            plots.plot_bench(result, plot)
        except OSError as exc:
            failed.append(f"--plot: could not write {str(plot)!r} ({exc.strerror or exc}); it is as it was")
        else:
            say(f"wrote {plot}")
    for message in failed:
        typer.echo(f"error: {message}", err=True)
    if failed:
        raise typer.Exit(1)


# -- shared by vanish, train and sample ------------------------------------------------------------
class _Failed(Exception):
    """Work that failed for a reason the user can act on: printed as ``error: ...``, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class _Interrupted(Exception):
    """Ctrl-C was pressed; raised between two training steps, where the run is consistent."""


def _install_sigint(handler):
    """Make ``handler`` answer SIGINT; return what to restore (None where signals cannot be set: a thread)."""
    try:
        return (signal.signal(signal.SIGINT, handler),)
    except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
        return None


def _restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous[0])


def _writable_or_exit(path: Path | None, option: str) -> Path | None:
    """``path`` once a file can be written there (see ``check_writable``), else a usage error."""
    if path is None:
        return None
    try:
        return check_writable(path, option)
    except DestinationError as exc:
        raise _usage_error(str(exc)) from exc


# library argument names in messages that reach the command line, and the flags that set them
_FLAGS = (
    ("(on_nonfinite='skip')", "(--on-nonfinite skip)"),
    ("on_nonfinite", "--on-nonfinite"),
    ("max_norm", "--clip"),
    ("hidden_size", "--hidden"),
    ("batch_size", "--batch"),
    ("eval_every", "--eval-every"),
)


def _in_flags(message: str) -> str:
    """``message`` with the library's argument names replaced by the flags (``max_norm`` → ``--clip``)."""
    for name, flag in _FLAGS:
        message = message.replace(name, flag)
    return message


def _reflowed_help(command):
    """Join the lines of each docstring paragraph, so ``--help`` wraps whole paragraphs to the terminal.

    Typer's rich help keeps the docstring's own line breaks and wraps each line again, which at
    80 columns cut sentences into ragged fragments ("the table gives the" / "spectral norm ...").
    """
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
    return command


def _quiet_numerics(command):
    """Run ``command`` with NumPy's floating-point RuntimeWarnings off: overflow and NaN are reported
    by the command itself (a refused or skipped step, ``inf`` in a table), not as warnings from NumPy's
    internals."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return command(*args, **kwargs)

    return run


def _out_of_memory(exc: MemoryError, be) -> typer.Exit:
    """'error: ran out of memory ...' with what the backend has left; exit 1 (nothing was written)."""
    avail = be.available_memory()
    left = "" if avail is None else f" ({format_bytes(avail)} available now on {be.name})"
    detail = f": {exc}" if str(exc) else ""
    typer.echo(f"error: ran out of memory{detail}{left}; try smaller sizes", err=True)
    return typer.Exit(1)


def _readable_or_exit(path: Path | None, option: str) -> Path | None:
    """``path`` unless it names a folder, a device or a pipe (``/dev/zero`` would never end), else a usage error."""
    if path is None:
        return None
    try:
        return check_regular_file(path, option)
    except DestinationError as exc:
        raise _usage_error(str(exc)) from exc


def _write_png(path: Path, what: str, draw) -> None:
    """Run ``draw(path)`` (a ``plots`` function: it writes atomically); _Failed on an OSError."""
    try:
        draw(path)
    except OSError as exc:
        raise _Failed(write_error(what, path, exc)) from exc


# -- gpubptt vanish: gradient-flow diagnostics --------------------------------------------------------
class InitChoice(str, Enum):
    wildml = "wildml"
    torch = "torch"


class VanishFormat(str, Enum):
    table = "table"
    json = "json"


RANDOM_SCALES = "0.5,0.9,1.0,1.5,2.0"
RANDOM_DEFAULTS = {"hidden": 64, "vocab": 32, "init": InitChoice.wildml}


def _parse_scales(text: str) -> list[float | None]:
    """Spectral radii from "0.5,0.9,model"; None stands for "model", W as it is."""
    scales: list[float | None] = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        if v.lower() == "model":
            scales.append(None)
            continue
        try:
            scales.append(float(v))
        except ValueError as exc:
            raise typer.BadParameter(
                f"must be comma-separated numbers like 0.5,0.9,1.0 or 'model', got {text!r}", param_hint="--scale"
            ) from exc
    if not scales or not all(r is None or (np.isfinite(r) and r > 0) for r in scales):
        raise typer.BadParameter(
            f"must be one or more spectral radii, finite and > 0, or 'model'; got {text!r}", param_hint="--scale"
        )
    return scales


def _horizon_text(p: diagnostics.JacobianProducts) -> str:
    if p.horizon is not None:
        return str(p.horizon)
    if p.horizon_fit is not None:
        return f"~{p.horizon_fit:.0f} (fit)"
    if p.log_slope is not None:
        return "none (grows)" if p.log_slope > diagnostics.NO_DECAY_SLOPE else "none (flat)"
    return f"none ≤ {p.end}"


def _vanish_row(radius: float, rescaled: bool, report: diagnostics.VanishReport, T: int) -> list[str]:
    p, tb = report.products, report.truncation
    ok = np.flatnonzero(tb.rel_error < 0.01)
    return [
        f"{radius:g}" if rescaled else f"{radius:.3f} (model)",
        f"{p.spectral_norm:.3f}",
        f"{100 * p.saturated_fraction:.1f}%",
        _horizon_text(p),
        "—" if p.decay_rate is None else f"{p.decay_rate:.4f}",
        f"{report.steps.s0:.3g}",
        str(int(tb.truncate[ok[0]])) if ok.size else f">{T - 1}",
    ]


@contextlib.contextmanager
def _vanish_progress(n: int):
    """A ``vanish_sweep`` progress callback: a transient bar on a terminal, else one stderr line per radius."""
    per = len(diagnostics.VANISH_STAGES)
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("vanish", total=n * per)

            def update(done: int, total: int, what: str) -> None:
                bar.update(task, description=what, completed=done, total=total)

            yield update
        return
    started, current = time.perf_counter(), [""]

    def line(done: int, total: int, what: str) -> None:
        if done and done % per == 0:
            elapsed = time.perf_counter() - started
            typer.echo(f"vanish: {current[0]} measured ({done // per}/{n}, {elapsed:.1f} s)", err=True)
        current[0] = what.split(":")[0]

    yield line


@app.command()
@_quiet_numerics
@_reflowed_help
def vanish(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to run on.")] = BackendChoice.auto,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A checkpoint from `gpubptt train`: measure its model on its own kind of data."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="With --checkpoint of a text model: a UTF-8 text file to cut the windows from, in the "
            "model's vocabulary. (default: the held-out text the model was trained on)"
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"Sequence length T. (default: {diagnostics.DEFAULT_SEQ_LEN}; "
            "a copy/recall checkpoint: the task's own length)",
        ),
    ] = None,
    hidden: Annotated[int | None, typer.Option(min=1, help="Hidden size H of the random model. (default: 64)")] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B (windows or task sequences).")] = 8,
    vocab: Annotated[
        int | None, typer.Option(min=1, help="Vocabulary size (D = K) of the random model's tokens. (default: 32)")
    ] = None,
    init: Annotated[InitChoice | None, typer.Option(help="Weight init of the random model. (default: wildml)")] = None,
    dtype: Annotated[
        DtypeChoice, typer.Option(help="Floating-point type (a checkpoint's weights are converted to it).")
    ] = DtypeChoice.float64,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the random weights and tokens, or of the windows / task sequences.")
    ] = 0,
    scale: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated spectral radii; W is rescaled to each in turn, 'model' keeps it as it is. "
            f"(default: {RANDOM_SCALES}; with --checkpoint: model, the trained W alone)"
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="The horizon is the first lag whose product norm is below this.")
    ] = 1e-3,
    iters: Annotated[int, typer.Option(min=1, help="Most power iterations per Jacobian-product norm.")] = 300,
    plot: Annotated[Path | None, typer.Option(help="Write the plots to this PNG file (needs matplotlib).")] = None,
    fmt: Annotated[VanishFormat, typer.Option("--format", help="Output: a table or JSON.")] = VanishFormat.table,
) -> None:
    """Show why BPTT gradients vanish or explode: one row per spectral radius of W.

    On a random model and random tokens, W is rescaled to each --scale radius; the table gives the
    spectral norm of W, the saturated fraction of states, the gradient horizon (first lag where
    ‖Π diag(1 − s_j²) W‖₂ < --threshold; "~N (fit)" extrapolates the fitted line when the sequence
    is too short to reach it), the fitted factor per step of that norm, ‖∂E/∂s0‖, and
    the smallest truncation window whose gradient is within 1 % of full BPTT.

    With --checkpoint, the trained model is measured as it is (one row, "ρ (model)" with ρ its own
    spectral radius) on B windows of T characters of its held-out text or of --data (targets: the
    next characters), or on B sequences of its copy/recall task; an explicit --scale rescales the
    trained W instead, and "model" among the radii keeps it. Windows and sequences come from --seed.
    """
    radii = _parse_scales(scale if scale is not None else ("model" if checkpoint is not None else RANDOM_SCALES))
    if not (np.isfinite(threshold) and threshold > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {threshold}", param_hint="--threshold")
    _readable_or_exit(checkpoint, "--checkpoint")
    if checkpoint is not None:
        given = {"hidden": hidden, "vocab": vocab, "init": init}
        for name, value in given.items():
            if value is not None:
                raise _usage_error(f"--{name} describes the random model; a checkpoint brings its own")
    elif data is not None:
        raise _usage_error("--data needs --checkpoint: the model whose vocabulary encodes the text")
    _check_plot(plot)
    _writable_or_exit(plot, "--plot")
    _readable_or_exit(data, "--data")
    be = _backend_or_exit(backend.value)
    if checkpoint is None:
        hidden = RANDOM_DEFAULTS["hidden"] if hidden is None else hidden
        vocab = RANDOM_DEFAULTS["vocab"] if vocab is None else vocab
        init = RANDOM_DEFAULTS["init"] if init is None else init
        T = diagnostics.DEFAULT_SEQ_LEN if seq_len is None else seq_len
    try:
        if checkpoint is None:
            problem = diagnostics.random_problem(
                T, hidden, batch, vocab, backend=be, dtype=dtype.value, init=init.value, seed=seed
            )
        else:
            problem = diagnostics.checkpoint_problem(
                checkpoint, T=seq_len, B=batch, seed=seed, backend=be, dtype=dtype.value, text=data
            )
    except InsufficientMemoryError as exc:
        sizes = "--seq-len or --batch" if checkpoint is not None else "--seq-len, --batch, --hidden or --vocab"
        raise _usage_error(f"{exc}: choose a smaller {sizes}") from exc
    except InputError as exc:  # CheckpointError included
        raise _usage_error(str(exc)) from exc
    except MemoryError as exc:
        raise _out_of_memory(exc, be) from exc
    model, x, y = problem.model, problem.x, problem.y
    T = problem.T
    settings = {"backend": be.name, "device": be.device, "T": T, "H": model.hidden_size, "B": batch}
    settings.update({k: v for k, v in problem.about.items() if k != "model"})
    settings.update({"dtype": dtype.value, "seed": seed, "threshold": threshold, "iters": iters})
    typer.echo("vanish: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "device"), err=True)
    try:
        with _vanish_progress(len(radii)) as progress:
            sweep = diagnostics.vanish_sweep(model, x, y, radii, threshold=threshold, iters=iters, progress=progress)
    except MemoryError as exc:
        raise _out_of_memory(exc, be) from exc
    rescaled = [r is not None for r in radii]
    if fmt is VanishFormat.json:
        scales = [{"radius": r, "rescaled": rs, **rep.to_dict()} for (r, rep), rs in zip(sweep, rescaled, strict=True)]
        typer.echo(json.dumps({"settings": settings, "scales": scales}, indent=1))
    else:
        head = ["ρ(W)", "‖W‖₂", "saturated", "horizon", "rate/step", "‖∂E/∂s0‖", "truncate@1%"]
        rows = [head] + [_vanish_row(r, rs, rep, T) for (r, rep), rs in zip(sweep, rescaled, strict=True)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            typer.echo("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    if plot is not None:
        if checkpoint is None:
            title = f"T={T} H={hidden} B={batch} vocab={vocab} init={init.value} seed={seed} ({be.name})"
        else:
            about = problem.about
            title = (
                f"{checkpoint.name} ({about['task']}, step {about['step']}) on {about['data']}: "
                f"T={T} H={model.hidden_size} B={batch} seed={seed} ({be.name})"
            )
        try:
            _write_png(plot, "plot", lambda path: plots.plot_vanish(sweep, path, title=title))
        except _Failed as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.code) from exc
        typer.echo(f"wrote {plot}", err=True)


# -- training and sampling --------------------------------------------------------------------------
class TaskChoice(str, Enum):
    text = "text"
    copy = "copy"
    recall = "recall"


class OptimizerChoice(str, Enum):
    sgd = "sgd"
    adagrad = "adagrad"
    adam = "adam"


class ScheduleChoice(str, Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"


class NonFiniteChoice(str, Enum):
    raise_ = "raise"
    skip = "skip"


def _describe(data) -> tuple[str, str]:
    """(unit, chance-level text) for the summary line."""
    if data.kind == "text":
        return "nats/char", (
            f"chance {data.chance_loss:.3f} = log {data.output_size}; letter frequencies alone {data.unigram_loss:.3f}"
        )
    return "nats/recalled symbol", f"chance {data.chance_loss:.3f} = log {data.A}; chance accuracy {1 / data.A:.1%}"


@app.command()
@_quiet_numerics
@_reflowed_help
def train(
    task: Annotated[
        TaskChoice | None, typer.Option(help="text: next-character prediction; copy / recall: long-range memory tasks.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="UTF-8 text file for --task text (default: a built-in generated corpus).")
    ] = None,
    delay: Annotated[
        int | None, typer.Option(help="copy/recall: blanks between the symbols and the cue. (default: 10)")
    ] = None,
    symbols: Annotated[int | None, typer.Option(help="copy/recall: alphabet size A. (default: 8)")] = None,
    copy_length: Annotated[int | None, typer.Option(help="copy: symbols to remember. (default: 5)")] = None,
    hidden: Annotated[int | None, typer.Option(help="Hidden size H. (default: 256)")] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size B (parallel sequences). (default: 32)")] = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            help="Truncated-BPTT chunk length, state carried across chunks; 0: whole sequences. "
            "(default: 64 for text, 0 for tasks)"
        ),
    ] = None,
    truncate: Annotated[
        int | None,
        typer.Option(help="Tutorial truncation inside each chunk (gradient through k+1 steps). (default: off)"),
    ] = None,
    backend: Annotated[BackendChoice, typer.Option(help="Backend to train on.")] = BackendChoice.auto,
    dtype: Annotated[DtypeChoice | None, typer.Option(help="Floating-point type. (default: float32)")] = None,
    bias: Annotated[bool | None, typer.Option("--bias/--no-bias", help="Biases b and c. (default: bias)")] = None,
    init: Annotated[InitChoice | None, typer.Option(help="Weight initialisation. (default: wildml)")] = None,
    optimizer: Annotated[OptimizerChoice | None, typer.Option(help="Optimizer. (default: adam)")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate. (default: adam 0.003, adagrad 0.1, sgd 0.1)")] = None,
    momentum: Annotated[float | None, typer.Option(help="SGD momentum. (default: 0)")] = None,
    clip: Annotated[
        float | None, typer.Option(help="Clip the global gradient norm to this; 0: off. (default: 5)")
    ] = None,
    schedule: Annotated[ScheduleChoice | None, typer.Option(help="Learning-rate schedule. (default: constant)")] = None,
    warmup: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up steps. (default: 0)")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Train until this many optimizer steps in total. (default: 3000)")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Text: train for this many passes over the training text instead of --steps.")
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Steps between held-out evaluations (and checkpoint saves).")] = 250,
    seed: Annotated[int | None, typer.Option(help="Seed of the weights and the data order. (default: 0)")] = None,
    on_nonfinite: Annotated[
        NonFiniteChoice | None, typer.Option(help="A NaN/inf loss or gradient stops training (raise) or is skipped.")
    ] = None,
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint file (.npz), saved at every evaluation.")] = Path(
        "checkpoint.npz"
    ),
    resume: Annotated[bool, typer.Option(help="Continue training the checkpoint (its settings apply).")] = False,
    accept_changed_data: Annotated[
        bool, typer.Option(help="With --resume: continue even though the training text changed since the save.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing checkpoint with a new run.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the loss curve to this PNG file (needs matplotlib).")] = None,
) -> None:
    """Train a vanilla RNN with truncated BPTT; report the loss beside the chance level; save a checkpoint.

    With no options: a character model of a built-in generated English-like corpus, about a minute on a CPU.
    """
    from .checkpoint import CheckpointError
    from .optim import NonFiniteError
    from .run import new_run, resume_run, save_run
    from .train import train as train_loop

    options = dict(
        task=task, data=data, delay=delay, symbols=symbols, copy_length=copy_length, hidden=hidden, batch=batch,
        chunk=chunk, truncate=truncate, dtype=dtype, bias=bias, init=init, optimizer=optimizer, lr=lr,
        momentum=momentum, clip=clip, schedule=schedule, warmup=warmup, seed=seed, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    given = {k: (v.value if isinstance(v, Enum) else v) for k, v in options.items() if v is not None}
    _check_plot(plot)
    _writable_or_exit(plot, "--plot")
    _writable_or_exit(checkpoint, "--checkpoint")  # before any work: training failed only at its first save
    _readable_or_exit(data, "--data")
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise _usage_error(f"--epochs must be a finite number > 0, got {epochs}")
    be = _backend_or_exit(backend.value)
    if resume and force:
        raise _usage_error("--resume and --force exclude each other")
    if checkpoint.exists() and not (resume or force):
        raise _usage_error(
            f"{str(checkpoint)!r} exists: pass --resume to continue training it, --force to replace it, "
            "or choose another --checkpoint"
        )
    try:
        if resume:
            run = resume_run(
                checkpoint,
                given=given,
                backend=be,
                steps=steps,
                epochs=epochs,
                eval_every=eval_every,
                accept_changed_data=accept_changed_data,
            )
        else:
            run = new_run(given, backend=be, steps=steps, epochs=epochs, eval_every=eval_every)
    except (InputError, CheckpointError, TypeError) as exc:
        raise _usage_error(_in_flags(str(exc))) from exc
    except MemoryError as exc:
        raise _out_of_memory(exc, be) from exc

    model, data_set, config, state, history = run.model, run.data, run.config, run.state, run.history
    unit, chance_text = _describe(data_set)
    typer.echo(
        f"{data_set!r} | {model!r} | {type(run.optimizer).__name__} lr={config.lr} | B={config.batch_size} "
        f"chunk={config.chunk or 'whole sequences'} | steps {state.step} → {config.steps}",
        err=True,
    )
    typer.echo(f"loss in {unit}; {chance_text}", err=True)
    if state.step >= config.steps:
        typer.echo(f"the checkpoint is already at step {state.step} ≥ --steps {config.steps}; nothing to do", err=True)

    interactive = sys.stderr.isatty()
    progress = None
    last = [None]
    window: deque = deque([(0.0, 0)], maxlen=50)  # (seconds, tokens so far): tokens/s over recent steps
    if interactive:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        bar = progress.add_task("train", total=config.steps, completed=state.step, info="")
        progress.start()

    saved = [state.step if resume else None]  # the step the checkpoint file holds
    stop = [False]

    def save() -> None:
        try:
            save_run(checkpoint, run)  # atomic: a failed write leaves the previous file as it was
        except OSError as exc:
            raise _Failed(write_error("checkpoint", checkpoint, exc)) from exc
        saved[0] = state.step

    def on_sigint(signum, frame) -> None:
        if stop[0]:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, mid-step
        stop[0] = True
        typer.echo("\nCtrl-C: stopping after this step and saving (Ctrl-C again to stop at once)", err=True)

    def on_step(ev) -> None:
        window.append((ev.seconds, window[-1][1] + ev.tokens))
        rate = (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-9)
        loss_s = "nan" if ev.loss is None else f"{ev.loss:.3f}"
        info = f"loss {loss_s}  |g| {ev.grad_norm:.2f}  {rate:,.0f} tok/s"
        if ev.eval is not None:
            last[0] = ev.eval
            save()  # between steps: the weights and the state are consistent
            line = (
                f"step {ev.step}/{ev.total}  train loss {loss_s}  held-out {ev.eval['loss']:.3f} "
                f"(chance {ev.eval['chance']:.3f})  acc {ev.eval['accuracy']:.1%}  |g| {ev.grad_norm:.2f}  "
                f"{rate:,.0f} tok/s"
            )
            if progress is not None:
                progress.console.print(line, highlight=False)
            else:
                typer.echo(line, err=True)
        if progress is not None:
            progress.update(bar, completed=ev.step, info=info)
        if stop[0]:
            raise _Interrupted  # between steps: the weights and the state are consistent

    start_step = state.step
    previous_sigint = _install_sigint(on_sigint)
    try:
        if state.step < config.steps:
            train_loop(model, data_set, run.optimizer, config, state=state, history=history, callback=on_step)
    except _Interrupted as exc:
        if progress is not None:
            progress.stop()
        try:
            save()
        except _Failed as failed:
            typer.echo(f"interrupted at step {state.step}\nerror: {failed}", err=True)
            raise typer.Exit(failed.code) from exc
        typer.echo(
            f"interrupted at step {state.step}; saved checkpoint {str(checkpoint)!r} at step {state.step} "
            "(continue with --resume)",
            err=True,
        )
        raise typer.Exit(130) from exc
    except KeyboardInterrupt as exc:
        if progress is not None:
            progress.stop()
        kept = "no checkpoint was saved" if saved[0] is None else f"{str(checkpoint)!r} keeps step {saved[0]}"
        typer.echo(f"interrupted during step {state.step + 1}, before it finished; {kept}", err=True)
        raise typer.Exit(130) from exc
    except NonFiniteError as exc:
        if progress is not None:
            progress.stop()
        typer.echo(
            f"error: {_in_flags(str(exc))}\n{str(checkpoint)!r} keeps the last evaluation's checkpoint, if any",
            err=True,
        )
        raise typer.Exit(1) from exc
    except _Failed as exc:
        if progress is not None:
            progress.stop()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
    except MemoryError as exc:
        if progress is not None:
            progress.stop()
        kept = "no checkpoint was saved" if saved[0] is None else f"{str(checkpoint)!r} keeps step {saved[0]}"
        typer.echo(f"training stopped during step {state.step + 1}; {kept}", err=True)
        raise _out_of_memory(exc, be) from exc
    finally:
        _restore_sigint(previous_sigint)
        if progress is not None:
            progress.stop()
    title = f"{data_set.kind} | H={model.hidden_size} | {type(run.optimizer).__name__}"
    if data_set.kind != "text":
        title += f" | delay {data_set.delay}"
    try:
        if not resume or state.step != start_step:  # a resume with nothing to do leaves the file as it was
            save()
        if plot is not None:
            _write_png(
                plot, "plot", lambda path: plots.plot_history(path, history, chance=data_set.chance_loss, title=title)
            )
    except _Failed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
    ev = last[0] or {"loss": float("nan"), "accuracy": float("nan")}
    if history.eval_step and last[0] is None:
        ev = {"loss": history.eval_loss[-1], "accuracy": history.eval_accuracy[-1]}
    train_loss = history.loss[-1] if history.loss else float("nan")
    typer.echo(
        f"step {state.step}: train loss {train_loss:.4f}, held-out loss {ev['loss']:.4f} {unit} "
        f"(accuracy {ev['accuracy']:.1%}); {chance_text}"
    )
    if history.skipped:
        typer.echo(f"{history.skipped} steps were skipped for a non-finite loss or gradient")
    typer.echo(f"checkpoint: {checkpoint}" + (f"\nplot: {plot}" if plot is not None else ""))


@app.command()
@_quiet_numerics
@_reflowed_help
def sample(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint of a text model (from `gpubptt train`).")] = Path(
        "checkpoint.npz"
    ),
    length: Annotated[int, typer.Option(help="Characters to generate.")] = 500,
    temperature: Annotated[float, typer.Option(help="Softmax temperature: < 1 surer, > 1 more random.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the sampler (an int ≥ 0).")] = 0,
    prime: Annotated[str, typer.Option(help="Text to start from (its characters must be in the vocabulary).")] = "",
) -> None:
    """Generate text from a trained character model, printed to stdout as each character is drawn."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .sample import sample_chars

    _readable_or_exit(checkpoint, "--checkpoint")
    if length < 0:
        raise _usage_error(f"--length must be ≥ 0, got {length}")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise _usage_error(f"--temperature must be a positive number, got {temperature}")
    try:
        ck = load_checkpoint(checkpoint, backend="numpy")
        if ck.vocab is None:
            kind = (ck.data or {}).get("kind", "unknown")
            raise _usage_error(f"{str(checkpoint)!r} was trained on the {kind} task; sampling needs a text model")
        chars = sample_chars(ck.model, ck.vocab, length=length, temperature=temperature, seed=seed, prime=prime)
    except (InputError, CheckpointError) as exc:  # every argument is checked before the first character
        raise _usage_error(str(exc)) from exc
    n = 0
    try:
        for ch in chars:
            typer.echo(ch, nl=False)  # flushed: the text appears as it is drawn
            n += len(ch)
        typer.echo("")
    except KeyboardInterrupt as exc:
        typer.echo("")
        typer.echo(f"interrupted after {n} of {len(prime) + length} characters", err=True)
        raise typer.Exit(130) from exc
    except BrokenPipeError as exc:  # `gpubptt sample | head`: the reader is gone; stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from exc


def main() -> None:
    """Entry point of the ``gpubptt`` console script."""
    app()
