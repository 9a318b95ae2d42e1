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
from ..bench.runner import BenchConfig
from ..cells import NONLINEARITIES, cell_class
from ..checkpoint import load_checkpoint
from ..environment import environment
from ..errors import CheckpointError
from ..model import CELLS, RNN
from ._common import (
    BackendChoice,
    DtypeChoice,
    app,
    backend_or_exit,
    check_plot,
    choices,
    readable_or_exit,
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
DEFAULT_NONLINEARITY = NonlinearityChoice(DEFAULTS.nonlinearity)


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
        "cell": model.cell.name,
        "nonlinearity": model.nonlinearity,
        "num_layers": model.num_layers,
        "bidirectional": model.bidirectional,
        "dropout": model.dropout,
        "sizes": {"D": model.input_size, "H": model.hidden_size, "K": model.output_size},
        "dtype": model.dtype.name,
        "parameters": sum(int(p.size) for p in model.params.values()),
        "shapes": {k: "×".join(map(str, v.shape)) for k, v in model.params.items()},
    }


@app.command()
def info(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to describe.")] = BackendChoice.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Also describe this checkpoint's model: architecture and parameter shapes.")
    ] = None,
) -> None:
    """Show the backend, device, library versions, BLAS build and thread counts (and a checkpoint's model)."""
    model = None
    if checkpoint is not None:
        readable_or_exit(checkpoint, "--checkpoint")
        try:
            model = load_checkpoint(checkpoint, backend="numpy").model
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
        "blas": env["blas"],
        "threads": env["threads"],
        "architectures": {"cells": list(CELLS), "nonlinearities": list(NONLINEARITIES), "bidirectional": True},
    }
    if model is not None:
        data["model"] = describe_model(model)
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
    if not sizes or min(sizes) < 1 or max(sizes) > 2**31 - 1:
        raise typer.BadParameter(f"{option} must be comma-separated positive ints (e.g. 16,32,64), got {value!r}")
    return sizes


@app.command()
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
    layers: Annotated[
        int, typer.Option(min=1, help="Stacked recurrent layers (torch.nn.RNN's num_layers).")
    ] = DEFAULTS.num_layers,
    bidirectional: Annotated[
        bool, typer.Option(help="Two directions per layer; the output layer reads both (H·2 inputs).")
    ] = False,
    nonlinearity: Annotated[
        NonlinearityChoice, typer.Option(help="φ of the recurrence, as torch.nn.RNN's.")
    ] = DEFAULT_NONLINEARITY,
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
            "unless --quiet. Its folder is checked for writing before any work."
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
    """
    Ts = _sizes(seq_lens, "--seq-lens")
    Hs = _sizes(hidden_sizes, "--hidden-sizes")
    if compare is CompareChoice.naive and (layers > 1 or bidirectional):
        raise usage_error("--compare naive times the one-layer textbook code: it needs --layers 1, one direction")
    if input is InputChoice.tokens and input_size is not None:
        raise typer.BadParameter("--input-size applies to --input dense; with tokens D = --vocab")
    output, plot = writable_or_exit(output, "--output"), writable_or_exit(plot, "--plot")
    if output is not None and plot is not None and output.resolve() == plot.resolve():
        raise usage_error(f"--output and --plot name the same file {str(output)!r}; give each its own")
    if format is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        format = FormatChoice(suffix) if suffix in ("json", "csv") else FormatChoice.table

    def say(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    check_plot(plot)
    if recompute is not None:
        _long(recompute, Ts, backend, batch, fixed_hidden or 256, vocab, dtype.value, seed, output, plot, say)
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
    if cell.value != DEFAULT_CELL.value and compare is CompareChoice.naive:
        raise typer.BadParameter("naive is the textbook tanh RNN: it compares --cell rnn only", param_hint="--compare")
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
        nonlinearity=nonlinearity.value,
    )
    arch = (
        f"{layers} layer{'s' if layers > 1 else ''}{', bidirectional' if bidirectional else ''}, {nonlinearity.value}"
    )
    sweeps = f"T in {Ts} at H={cfg.fixed_H}, H in {Hs} at T={cfg.fixed_T}"
    say(f"gpubptt bench: backends {', '.join(names)}; {arch}; {sweeps}")
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
        text = bench_lib.render(result, format.value)
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
        typer.echo(bench_lib.render(result, format.value), nl=False)
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


def _long(policies_text, Ts, backend, B, H, vocab, dtype, seed, output, plot, say) -> None:
    """``bench --recompute``: the long-sequence sweep of ``gpubptt.bench.long``."""
    from ..bench.long import POLICIES, long_sweep, plot_long, render_long

    policies = [p.strip() for p in policies_text.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        raise usage_error(
            f"--recompute must list policies from {', '.join(POLICIES)} (e.g. sqrt,none), got {policies_text!r}"
        )
    if backend is BenchBackendChoice.all:
        raise usage_error("--recompute measures one backend: choose --backend numpy or cupy")
    be = backend_or_exit(backend.value)
    avail = be.available_memory()
    say(f"gpubptt bench --recompute {','.join(policies)}: T in {Ts}, B={B}, H={H}, tokens D=K={vocab}, {be.name}")
    progress = lambda row: say(render_long({**_empty, "rows": [row]}).splitlines()[0])  # noqa: E731
    _empty = {"rows": [], "longest_T": {}, "budget_bytes": 0}
    result = long_sweep(
        be, Ts, policies=policies, B=B, H=H, vocab=vocab, dtype=dtype, seed=seed,
        stored_limit=None if avail is None else avail // 2, progress=progress,
    )  # fmt: skip
    result["environment"] = environment([be])
    result["argv"] = ["gpubptt", *sys.argv[1:]]
    typer.echo(render_long(result), nl=False)
    if output is not None:
        write_atomic(output, json.dumps(result, indent=1) + "\n")
        say(f"wrote {output}")
    if plot is not None:
        plot_long(result, plot)
        say(f"wrote {plot}")
