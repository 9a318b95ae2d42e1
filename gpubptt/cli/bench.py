"""``gpubptt info`` and ``gpubptt bench``: the backend and machine, and how forward+BPTT cost grows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .. import bench as bench_lib
from .. import plots
from .._io import write_atomic
from ..backend import BACKEND_NAMES, available_backends
from ..bench import COMPARES, INPUTS
from ..bench.config import BenchConfig
from ..bench.long import POLICIES, long_sweep, plot_long, render_long
from ..cells import NONLINEARITIES, cell_class
from ..engine.memory import InsufficientMemoryError
from ..engine.recompute import unsupported_reason
from ..environment import environment
from ..errors import CheckpointError
from ..model import CELLS, RNN
from ..training.record import Checkpoint, load_checkpoint
from ._common import (
    EXIT_SAVED_NO_STDOUT,
    BackendChoice,
    DtypeChoice,
    PrecisionChoice,
    StdoutFailed,
    app,
    backend_or_exit,
    check_plot,
    choices,
    distinct_or_exit,
    echo_out,
    in_flags,
    jit_or_exit,
    layers_or_exit,
    out_of_memory,
    readable_or_exit,
    stderr_is_terminal,
    stdout_errors,
    usage_error,
    writable_or_exit,
)

BenchBackendChoice = choices("BenchBackendChoice", (*BACKEND_NAMES, "all"))
InputChoice = choices("InputChoice", INPUTS)
CompareChoice = choices("CompareChoice", COMPARES)
CellChoice = choices("CellChoice", CELLS)
DEFAULT_CELL = CellChoice(CELLS[0])
FormatChoice = choices("FormatChoice", ("table", "json", "csv"))
NonlinearityChoice = choices("NonlinearityChoice", NONLINEARITIES)
DEFAULTS = BenchConfig(backends=[])  # the library's defaults are the options' defaults
DEFAULT_INPUT, DEFAULT_DTYPE = InputChoice(DEFAULTS.input), DtypeChoice(DEFAULTS.dtype)
DEFAULT_COMPARE = CompareChoice(DEFAULTS.compare)


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


def describe_model(model: RNN) -> dict[str, object]:
    """What ``info --checkpoint`` shows of a model: its architecture and its parameters' shapes."""
    return {
        "cell": model.cell_name,  # as the CLI names it (--cell rnn), not the cell class's "elman"
        "nonlinearity": model.nonlinearity,
        "num_layers": model.num_layers,
        "bidirectional": model.bidirectional,
        "dropout": model.dropout,
        "sizes": {"D": model.input_size, "H": model.hidden_size, "K": model.output_size},
        "dtype": model.dtype.name,
        "parameters": sum(int(p.size) for p in model.params.values()),
        "shapes": {k: "×".join(map(str, v.shape)) for k, v in model.params.items()},
    }


def describe_training(ck: Checkpoint) -> dict[str, object] | None:
    """What ``info --checkpoint`` shows of a run: its step, last and best held-out losses, and its data's name
    and sha256 (text: the file or the built-in corpus; a task: its settings). None for a bare model."""
    if ck.data is None and ck.config is None:
        return None
    h, d = ck.history, ck.data or {}
    best = h.best()
    out: dict[str, object] = {
        "step": ck.state.step,
        "steps": None if ck.config is None else ck.config.steps,
        "last_held_out": None if not h.eval_step else {"step": h.eval_step[-1], "loss": h.eval_loss[-1]},
        "best_held_out": None if best is None else {"step": best[0], "loss": best[1]},
    }
    if d.get("kind") == "text":
        source = d.get("source")
        out["data"] = {"task": "text", "name": "the built-in corpus" if source == "builtin" else source,
                       "sha256": d.get("sha256")}  # fmt: skip
        if d.get("val_source") is not None:
            out["val_data"] = {"name": d["val_source"], "sha256": d.get("val_sha256")}
    elif d.get("kind") is not None:
        out["data"] = {"task": d["kind"], **{k: v for k, v in d.items() if k != "kind"}}
    return out


@app.command()
@stdout_errors
def info(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to describe.")] = BackendChoice.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Also describe this checkpoint: the model's architecture and parameter shapes, the step, the last "
            "and best held-out losses, and the data's name and sha256."
        ),
    ] = None,
) -> None:
    """Show the backend, device, library versions, BLAS build and thread counts (and a checkpoint's model)."""
    model = ck = None
    if checkpoint is not None:
        readable_or_exit(checkpoint, "--checkpoint")
        distinct_or_exit({}, {"--checkpoint": checkpoint})
        try:
            ck = load_checkpoint(checkpoint, backend="numpy")
            model = ck.model
        except CheckpointError as exc:
            raise usage_error(str(exc)) from exc
    be = backend_or_exit(backend.value)
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
        "blas": {"in_use": be.blas_library, **env["blas"]},  # in_use: the library behind the backend's GEMMs
        "jit": {"in_use": jit_or_exit(be.name)},  # the gated cells' step kernels (GPUBPTT_JIT)
        "threads": env["threads"],
        "architectures": {"cells": list(CELLS), "nonlinearities": list(NONLINEARITIES), "bidirectional": True},
    }
    if model is not None:
        data["model"] = describe_model(model)
        if (training := describe_training(ck)) is not None:
            data["training"] = training
    if as_json:
        echo_out(json.dumps(data, indent=2))
        return
    for k, v in _flat(data):
        echo_out(f"{k:>32}: {'-' if v is None else v}")


def _sizes(value: str, option: str) -> list[int]:
    try:
        sizes = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1 or max(sizes) > 2**31 - 1:
        raise typer.BadParameter(f"{option} must be comma-separated positive ints (e.g. 16,32,64), got {value!r}")
    return sizes


@app.command()
@stdout_errors
def bench(
    backend: Annotated[
        BenchBackendChoice, typer.Option(help="Backend to measure; 'all' runs every backend available here.")
    ] = BenchBackendChoice.auto,
    seq_lens: Annotated[str, typer.Option(help="Sequence lengths T of the T sweep, comma-separated.")] = ",".join(
        map(str, DEFAULTS.seq_lens)
    ),
    hidden_sizes: Annotated[str, typer.Option(help="Hidden sizes H of the H sweep, comma-separated.")] = ",".join(
        map(str, DEFAULTS.hidden_sizes)
    ),
    fixed_hidden: Annotated[
        int | None, typer.Option(min=1, help="H of the T sweep (default: the middle of --hidden-sizes).")
    ] = None,
    fixed_seq_len: Annotated[
        int | None, typer.Option(min=1, help="T of the H sweep (default: the middle of --seq-lens).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B.")] = DEFAULTS.batch,
    input: Annotated[
        InputChoice, typer.Option(help="tokens: (T, B) ids, one-hot (a gather); dense: (T, B, D) floats.")
    ] = DEFAULT_INPUT,
    vocab: Annotated[
        int, typer.Option(min=1, help="Vocabulary size: D = K for tokens (dense: default D, K).")
    ] = DEFAULTS.D,
    input_size: Annotated[int | None, typer.Option(min=1, help="D for --input dense (default: --vocab).")] = None,
    output_size: Annotated[int | None, typer.Option(min=1, help="K, the number of classes (default: --vocab).")] = None,
    dtype: Annotated[DtypeChoice, typer.Option(help="Floating-point type.")] = DEFAULT_DTYPE,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(
            help="GEMM operand precision (float32 only): fp32, tf32 or bf16 (rounded to nearest even, float32 "
            "accumulation); torch runs the matching setting (TF32 matmuls, bf16 autocast)."
        ),
    ] = PrecisionChoice.fp32,
    layers: Annotated[
        int, typer.Option(min=1, help="Stacked recurrent layers (torch.nn.RNN's num_layers).")
    ] = DEFAULTS.num_layers,
    bidirectional: Annotated[
        bool, typer.Option(help="Two directions per layer; the output layer reads both (H·2 inputs).")
    ] = False,
    nonlinearity: Annotated[
        NonlinearityChoice | None,
        typer.Option(
            help="φ of the recurrence, as torch.nn.RNN's; --cell rnn or indrnn only. (default: the cell's own: "
            "tanh for rnn, relu for indrnn)"
        ),
    ] = None,
    warmup: Annotated[
        int, typer.Option(min=0, help="Untimed runs before timing each configuration.")
    ] = DEFAULTS.warmup,
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed runs per configuration (median reported).")
    ] = DEFAULTS.repeats,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed of the weights and data (fixed per configuration).")
    ] = DEFAULTS.seed,
    cell: Annotated[
        CellChoice, typer.Option(help="The recurrent cell (torch compared as nn.RNN, nn.GRU or nn.LSTM).")
    ] = DEFAULT_CELL,
    compare: Annotated[
        CompareChoice,
        typer.Option(help="Also time a reference: torch (nn.RNN + Linear + cross_entropy) or naive (per example)."),
    ] = DEFAULT_COMPARE,
    format: Annotated[
        FormatChoice | None, typer.Option(help="Output format (default: from --output's suffix, else table).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Write the result to this file (atomically, in --format); the table still prints on stdout "
            "unless --quiet. Its folder is checked for writing before any work; an existing .npz or other "
            "NumPy or zip file (a checkpoint) is refused, not replaced."
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a log-log PNG of time vs T and vs H here.")] = None,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress or messages on stderr; with --output, no table on stdout."),
    ] = False,
    recompute: Annotated[
        str | None,
        typer.Option(
            help="Long sequences instead: time and measured peak memory against T (--seq-lens, at --fixed-hidden, "
            "default 256) for these policies, comma-separated: none (every state stored), sqrt (recompute in "
            "√T segments). Stored runs that would not fit in half the available memory are skipped."
        ),
    ] = None,
) -> None:
    """Time forward+BPTT as T grows (at fixed H) and as H grows (at fixed T).

    Each row: median/min/IQR time, tokens/s, µs per step, GFLOP/s and efficiency vs same-shaped GEMMs.

    At the end: the fitted exponents a, b of time ∝ T^a (fixed H) and time ∝ H^b (fixed T).

    Timings whose IQR/median exceeds 10 % are marked noisy (~), and so is each exponent fitted through them.

    Results go to stdout, or to --output with the table still on stdout; messages go to stderr.

    A file that cannot be written at the end: bench says so, prints its content on stdout, and exits with 1.

    A bench in which no configuration ran (every row out of memory) exits with 1 too.
    """
    Ts = _sizes(seq_lens, "--seq-lens")
    layers_or_exit(layers)
    takes = cell_class(cell.value).takes_nonlinearity
    if nonlinearity is not None and not takes:  # as train: a GRU or LSTM is never labelled relu
        raise usage_error(
            f"--nonlinearity applies to --cell rnn or indrnn, not --cell {cell.value} (the GRU's and LSTM's gates use "
            "σ and tanh)"
        )
    phi = None if nonlinearity is None else nonlinearity.value  # None: the cell's own (tanh for rnn, relu for indrnn)
    Hs = _sizes(hidden_sizes, "--hidden-sizes")
    if compare is CompareChoice.naive and (layers > 1 or bidirectional):
        raise usage_error("--compare naive times the one-layer textbook code: it needs --layers 1, one direction")
    if input is InputChoice.tokens and input_size is not None:
        raise typer.BadParameter("--input-size applies to --input dense; with tokens D = --vocab")
    given, output, plot = output, writable_or_exit(output, "--output"), writable_or_exit(plot, "--plot")
    _not_an_archive_or_exit(output, given)
    distinct_or_exit({"--output": output, "--plot": plot})
    if format is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        format = FormatChoice(suffix) if suffix in ("json", "csv") else FormatChoice.table

    def say(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    check_plot(plot)
    if recompute is not None:
        sweep_only = {
            "--hidden-sizes": hidden_sizes != ",".join(map(str, DEFAULTS.hidden_sizes)),
            "--fixed-seq-len": fixed_seq_len is not None, "--input": input is not DEFAULT_INPUT,
            "--input-size": input_size is not None, "--output-size": output_size is not None,
            "--warmup": warmup != DEFAULTS.warmup, "--repeats": repeats != DEFAULTS.repeats,
            "--compare": compare is not DEFAULT_COMPARE, "--precision": precision is not PrecisionChoice.fp32,
        }  # fmt: skip
        arch = dict(
            cell=cell.value, num_layers=layers, nonlinearity=phi if takes else None,
            bidirectional=bidirectional,
        )  # fmt: skip
        _long(
            recompute, Ts, backend, batch, fixed_hidden or 256, vocab, dtype.value, seed, output, plot, say,
            fmt=format.value, arch=arch, ignored=[k for k, given in sweep_only.items() if given], quiet=quiet,
        )  # fmt: skip
        return
    requested = available_backends() if backend is BenchBackendChoice.all else [backend.value]
    names = list(dict.fromkeys(backend_or_exit(name).name for name in requested))  # fails here, before any work
    if compare is CompareChoice.torch and cell_class(cell.value).torch_module is None:
        raise typer.BadParameter(
            f"torch has no module for --cell {cell.value}: use --compare none", param_hint="--compare"
        )
    if compare is CompareChoice.torch and (reason := bench_lib.torch_unavailable_reason()):
        typer.echo(f"warning: {reason}; continuing without the torch comparison", err=True)
        compare = CompareChoice.none
    if precision is not PrecisionChoice.fp32 and (dtype.value != "float32" or compare is CompareChoice.naive):
        why = f"--dtype {dtype.value}" if dtype.value != "float32" else "--compare naive (float32 NumPy code)"
        raise typer.BadParameter(f"--precision {precision.value} rounds float32 GEMMs; not with {why}")
    if cell.value != DEFAULT_CELL.value and compare is CompareChoice.naive:
        raise typer.BadParameter("naive is the textbook tanh RNN: it compares --cell rnn only", param_hint="--compare")
    if phi not in (None, "tanh") and compare is CompareChoice.naive:
        raise typer.BadParameter(
            f"naive is the textbook tanh RNN: it compares --nonlinearity tanh only, got {phi}", param_hint="--compare"
        )
    cfg = BenchConfig(
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
        cell=cell.value,
        fixed_T=fixed_seq_len,
        fixed_H=fixed_hidden,
        num_layers=layers,
        bidirectional=bidirectional,
        nonlinearity=phi,
        precision=precision.value,
    )
    arch = (
        f"{layers} layer{'s' if layers > 1 else ''}{', bidirectional' if bidirectional else ''}, "
        f"{cfg.nonlinearity if cell.value == 'rnn' else cell.value + (f' {cfg.nonlinearity}' if takes else '')}"
        + ("" if precision is PrecisionChoice.fp32 else f", precision {precision.value}")
    )
    sweeps = f"T in {Ts} at H={cfg.fixed_H}, H in {Hs} at T={cfg.fixed_T}"
    say(f"gpubptt bench: backends {', '.join(names)}; {arch}; {sweeps}")
    result = _run_with_progress(cfg, quiet)
    for note in result["notes"]:
        say(f"note: {note}")
    _report_bench(result, output, plot, format.value, quiet, say)


def _not_an_archive_or_exit(output: Path | None, given: Path | None) -> None:
    """A usage error for an --output that exists and is a NumPy or zip file (a .npz checkpoint, most likely), by its
    first bytes: bench's table, JSON or CSV would replace it. Other existing files (earlier results) are replaced.
    ``output``: the checked path (links resolved); ``given``: as the user wrote it, for the message."""
    if output is None or not output.is_file():
        return
    try:
        with open(output, "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""  # unreadable: the probe of its folder and the write say what is wrong
    if head.startswith((b"PK\x03\x04", b"\x93NUMPY")):  # by what it holds: bench's own earlier table is replaced
        raise usage_error(
            f"--output {str(given)!r} exists and is a NumPy or zip archive (a checkpoint?); bench would replace it "
            "with its results: give --output a .json, .csv or table file name, or remove that file first"
        )


def _run_with_progress(cfg: BenchConfig, quiet: bool) -> dict:
    """``bench_lib.run_bench``, with a progress bar on a terminal's stderr (unless ``quiet``)."""
    argv = ["gpubptt", *sys.argv[1:]]
    if stderr_is_terminal() and not quiet:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("bench", total=None)

            def progress(desc: str, done: int, total: int) -> None:
                bar.update(task, description=desc, completed=done, total=total)

            return bench_lib.run_bench(cfg, progress=progress, argv=argv)
    return bench_lib.run_bench(cfg, argv=argv)


def _report_bench(result: dict, output: Path | None, plot: Path | None, fmt: str, quiet: bool, say) -> None:
    """The results to --output (the table still on stdout unless ``quiet``) or stdout, the plot to --plot;
    a file that cannot be written is reported, its content on stdout, and bench exits with 1."""
    failed: list[str] = []  # a file that cannot be written now must not lose the run
    lost: list[StdoutFailed] = []  # nor a stdout that cannot be written the files still to come
    written: list[str] = []

    def show(text: str) -> None:
        try:
            echo_out(text, nl=False)
        except StdoutFailed as exc:
            lost.append(exc)

    if output is not None:
        text = bench_lib.render(result, fmt)
        try:
            write_atomic(output, text)
        except OSError as exc:
            show(text)  # what the file would have held, so the results survive
            failed.append(
                f"--output: could not write {str(output)!r} ({exc.strerror or exc}); it is as it was, "
                f"and its {fmt} content is on stdout instead"
            )
        else:
            written.append(str(output))
            say(f"wrote {output}")
            if not quiet:
                show(bench_lib.render_table(result))
    else:
        show(bench_lib.render(result, fmt))
    if plot is not None:
        try:
            plots.plot_bench(result, plot)
        except OSError as exc:
            failed.append(f"--plot: could not write {str(plot)!r} ({exc.strerror or exc}); it is as it was")
        else:
            say(f"wrote {plot}")
    if not any(row["status"] == "ok" for row in result["rows"]):
        failed.append(
            f"every configuration ran out of memory ({len(result['rows'])} rows); nothing was measured: "
            "try smaller --seq-lens, --hidden-sizes or --batch"
        )
    for message in failed:
        typer.echo(f"error: {message}", err=True)
    if lost:
        if written and not failed:  # the results are in their file: only the copy on stdout is lost
            lost[0].kept, lost[0].code = f"the results were written to {written[0]!r}", EXIT_SAVED_NO_STDOUT
        raise lost[0]
    if failed:
        raise typer.Exit(1)


def _long(
    policies_text, Ts, backend, B, H, vocab, dtype, seed, output, plot, say, *, fmt, arch, ignored, quiet=False
) -> None:
    """``bench --recompute``: the long-sequence sweep of ``gpubptt.bench.long``.

    ``arch``: cell, num_layers, nonlinearity, bidirectional of the model timed; ``ignored``: the
    options of the T/H sweep that were given (each refused by name, before any work).
    """
    policies = [p.strip() for p in policies_text.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise usage_error(
            f"--recompute must list policies from {', '.join(POLICIES)} (e.g. sqrt,none), got {policies_text!r}"
        )
    for option in ignored:
        raise usage_error(
            f"{option} applies to the T and H sweeps, not to --recompute (tokens, T from --seq-lens at "
            "--fixed-hidden, each (T, policy) timed once after a warm-up call)"
        )
    if fmt == "csv":
        raise usage_error("--recompute writes a table or json (--format table|json, or --output *.json)")
    if backend is BenchBackendChoice.all:
        raise usage_error("--recompute measures one backend: choose --backend numpy or cupy")
    be = backend_or_exit(backend.value)
    bidirectional = arch.pop("bidirectional")
    probe = RNN(2, 1, 2, backend="numpy", bidirectional=bidirectional, **arch)  # tiny: only asks what it can do
    if reason := unsupported_reason(probe):
        raise usage_error(f"--recompute: {reason}")
    avail = be.available_memory()
    what = f"{arch['cell']}" + (f", {arch['num_layers']} layers" if arch["num_layers"] > 1 else "")
    say(
        f"gpubptt bench --recompute {','.join(policies)}: T in {Ts}, B={B}, H={H} ({what}), tokens D=K={vocab}, "
        f"{be.name}"
    )
    progress = lambda row: say(render_long({**_empty, "rows": [row]}).splitlines()[0])  # noqa: E731
    _empty = {"rows": [], "longest_T": {}, "budget_bytes": 0}
    try:
        result = long_sweep(
            be, Ts, policies=policies, B=B, H=H, vocab=vocab, dtype=dtype, seed=seed,
            stored_limit=None if avail is None else avail // 2, progress=progress, **arch,
        )  # fmt: skip
    except MemoryError as exc:
        raise out_of_memory(exc, be) from exc
    except InsufficientMemoryError as exc:  # the model itself cannot fit: refused before any measurement
        raise usage_error(in_flags(str(exc))) from exc
    result["environment"] = environment([be])
    result["argv"] = ["gpubptt", *sys.argv[1:]]
    as_json = json.dumps(result, indent=1) + "\n"
    failed: list[str] = []
    if output is not None:
        try:
            write_atomic(output, as_json if fmt == "json" else render_long(result))
        except OSError as exc:
            failed.append(f"--output: could not write {str(output)!r} ({exc.strerror or exc}); it is as it was")
        else:
            say(f"wrote {output}")
    lost = None  # a stdout that cannot be written must not lose the plot still to come
    if failed or output is None:  # on a failed write, the file's content, which would be lost otherwise (-q or not)
        text = as_json if fmt == "json" else render_long(result)
    else:  # the table beside the file, unless -q
        text = None if quiet else render_long(result)
    if text is not None:
        try:
            echo_out(text, nl=False)
        except StdoutFailed as exc:
            lost = exc
    if plot is not None:
        try:
            plot_long(result, plot)
        except OSError as exc:
            failed.append(f"--plot: could not write {str(plot)!r} ({exc.strerror or exc}); it is as it was")
        else:
            say(f"wrote {plot}")
    if not any("skipped" not in row for row in result["rows"]):
        failed.append(
            f"every run was skipped ({len(result['rows'])} rows); nothing was measured: try smaller --seq-lens"
        )
    for message in failed:
        typer.echo(f"error: {message}", err=True)
    if lost is not None:
        if output is not None and not failed:
            lost.kept, lost.code = f"the results were written to {str(output)!r}", EXIT_SAVED_NO_STDOUT
        raise lost
    if failed:
        raise typer.Exit(1)
