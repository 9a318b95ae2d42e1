"""``gpubptt vanish``: why BPTT gradients vanish or explode, measured on a random or a trained model."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from .. import diagnostics, plots
from ..cells import NONLINEARITIES
from ..diagnostics import DEFAULT_ITERS, DEFAULT_THRESHOLD
from ..diagnostics.problems import DEFAULT_SEQ_LEN, checkpoint_problem, random_problem
from ..engine.memory import InsufficientMemoryError
from ..errors import InputError
from ..model import CELLS, INITS
from ._common import (
    BackendChoice,
    DtypeChoice,
    Failed,
    app,
    backend_or_exit,
    check_plot,
    choices,
    distinct_or_exit,
    echo_out,
    layers_or_exit,
    out_of_memory,
    quiet_numerics,
    readable_or_exit,
    reflowed_help,
    stderr_is_terminal,
    stdout_errors,
    usage_error,
    writable_or_exit,
    write_png,
)
from ._vanish_cells import parse_cells, run_cells, run_model
from .sample import WHICH_HELP, WhichChoice, which_checkpoint

InitChoice = choices("InitChoice", INITS)
VanishFormat = choices("VanishFormat", ("table", "json"))
NonlinearityChoice = choices("NonlinearityChoice", NONLINEARITIES)

DEFAULT_DTYPE = DtypeChoice("float64")  # as diagnostics.random_problem
RANDOM_SCALES = "0.5,0.9,1.0,1.5,2.0"
RANDOM_DEFAULTS = {"hidden": 64, "vocab": 32, "init": InitChoice("wildml"), "batch": 8}


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


def _decay_text(d: diagnostics.stack.Decay, n: int) -> str:
    if d.horizon is not None:
        return str(d.horizon)
    if d.horizon_fit is not None:
        return f"~{d.horizon_fit:.0f} (fit)"
    return f"none ≤ {n}"


def _stack_rows(radius: float | None, report: diagnostics.StackReport, T: int) -> list[list[str]]:
    """One row per recurrence: its W, its own products, and (one direction) the products from the top."""
    rows = []
    through = report.through_stack
    for r in report.recurrences:
        top = None if through is None else through.per_layer[r.layer]
        rows.append(
            [
                "model" if radius is None else f"{radius:g}",
                f"{r.layer}" + (" rev" if r.direction else ""),
                f"{r.spectral_radius:.3f}",
                f"{r.spectral_norm:.3f}",
                f"{100 * r.saturated_fraction:.1f}%",
                _decay_text(r.own, T - 1),
                "—" if r.own.decay_rate is None else f"{r.own.decay_rate:.4f}",
                "—" if top is None else _decay_text(top, T - 1),
                "—" if top is None or top.decay_rate is None else f"{top.decay_rate:.4f}",
                f"{r.grad_s0:.3g}",
            ]
        )
    return rows


def _vanish_stack(model, x, y, radii, *, T: int, threshold: float, iters: int, fmt, settings, plot, title) -> None:
    """``gpubptt vanish`` for a stack: one row per radius and recurrence (``diagnostics.stack_sweep``)."""
    n = len(radii)
    with _vanish_progress(n, per=1) as progress:
        sweep = diagnostics.stack_sweep(model, x, y, radii, threshold=threshold, iters=iters, progress=progress)
    if fmt is VanishFormat.json:
        scales = [{"radius": r, "rescaled": r is not None, **rep.to_dict()} for r, rep in sweep]
        echo_out(json.dumps({"settings": settings, "scales": scales}, indent=1))
    else:
        head = ["ρ", "layer", "ρ(W_l)", "‖W_l‖₂", "saturated", "horizon", "rate/step", "top←l horizon", "top←l rate",
                "‖∂E/∂s0_l‖"]  # fmt: skip
        rows = [head] + [row for r, rep in sweep for row in _stack_rows(r, rep, T)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            echo_out("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        typer.echo(
            "horizon, rate/step: each recurrence's own ‖Π diag(φ'_j) W_l‖₂ against the lag; top←l: "
            "‖∂s^top_T−1/∂s^l_T−1−ℓ‖₂ through the stack (one direction only)",
            err=True,
        )
    if plot is not None:
        _write_plot(plot, lambda path: plots.plot_stack(sweep, path, title=title))


def _write_plot(plot: Path, draw) -> None:
    """Write the figure atomically; a failure is one error line and the exit code of ``write_png``."""
    try:
        write_png(plot, "plot", draw)
    except Failed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
    typer.echo(f"wrote {plot}", err=True)


@contextlib.contextmanager
def _vanish_progress(n: int, per: int = len(diagnostics.VANISH_STAGES)):
    """A ``vanish_sweep`` progress callback: a transient bar on a terminal, else one stderr line per radius."""
    if stderr_is_terminal():
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


def _compare_cells(
    cell: str, ignored: dict, backend: BackendChoice, plot: Path | None, threshold: float, seq_len: int | None,
    hidden: int | None, batch: int, vocab: int | None, seed: int, fmt: VanishFormat,
) -> None:  # fmt: skip
    """``vanish --cell``: random one-layer models of each cell, side by side (``ignored``: options given
    that describe one model, each refused by name)."""
    cells = parse_cells(cell)
    for name, value in ignored.items():
        if value is not None:
            raise usage_error(
                f"--{name} does not apply with --cell (one-layer random models of each cell, torch's init)"
            )
    if backend.value == "cupy":
        raise usage_error("--cell compares the cells on the host in float64: --backend cupy does not apply")
    check_plot(plot)
    writable_or_exit(plot, "--plot")
    if not (np.isfinite(threshold) and threshold > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {threshold}", param_hint="--threshold")
    run_cells(
        cells, T=DEFAULT_SEQ_LEN if seq_len is None else seq_len, H=RANDOM_DEFAULTS["hidden"] if hidden is None
        else hidden, B=batch, vocab=RANDOM_DEFAULTS["vocab"] if vocab is None else vocab, seed=seed,
        threshold=threshold, fmt=fmt.value, plot=plot,
    )  # fmt: skip
    return


@app.command()
@stdout_errors
@quiet_numerics
@reflowed_help
def vanish(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to run on.")] = BackendChoice.auto,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A checkpoint from `gpubptt train`: measure its model on its own kind of data."),
    ] = None,
    which: Annotated[
        WhichChoice | None, typer.Option(help=WHICH_HELP[:-1] + " (default: last; needs --checkpoint)")
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
            help=f"Sequence length T. (default: {DEFAULT_SEQ_LEN}; a copy/recall checkpoint: the task's own length)",
        ),
    ] = None,
    hidden: Annotated[
        int | None,
        typer.Option(min=1, help=f"Hidden size H of the random model. (default: {RANDOM_DEFAULTS['hidden']})"),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B (windows or task sequences).")] = RANDOM_DEFAULTS[
        "batch"
    ],
    vocab: Annotated[
        int | None,
        typer.Option(
            min=1, help=f"Vocabulary size (D = K) of the random model's tokens. (default: {RANDOM_DEFAULTS['vocab']})"
        ),
    ] = None,
    init: Annotated[
        InitChoice | None,
        typer.Option(help=f"Weight init of the random model. (default: {RANDOM_DEFAULTS['init'].value})"),
    ] = None,
    layers: Annotated[
        int | None,
        typer.Option(
            min=1, help="Layers of the random model; a stack is measured per layer and through it. (default: 1)"
        ),
    ] = None,
    bidirectional: Annotated[
        bool | None, typer.Option("--bidirectional", help="A bidirectional random model (each direction measured).")
    ] = None,
    nonlinearity: Annotated[
        NonlinearityChoice | None, typer.Option(help="φ of the random model's recurrence. (default: tanh)")
    ] = None,
    dtype: Annotated[
        DtypeChoice, typer.Option(help="Floating-point type (a checkpoint's weights are converted to it).")
    ] = DEFAULT_DTYPE,
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
    ] = DEFAULT_THRESHOLD,
    iters: Annotated[int, typer.Option(min=1, help="Most power iterations per Jacobian-product norm.")] = DEFAULT_ITERS,
    plot: Annotated[Path | None, typer.Option(help="Write the plots to this PNG file (needs matplotlib).")] = None,
    fmt: Annotated[VanishFormat, typer.Option("--format", help="Output: a table or JSON.")] = VanishFormat.table,
    cell: Annotated[
        str | None,
        typer.Option(
            help=f"Compare cells instead: {', '.join(CELLS)} (comma-separated), each a random model of the same H on "
            "the same tokens; the table gives each cell's horizon and rate per step (the LSTM's cell-state "
            "path ∂c_t/∂c_k too), ‖∂E/∂s0‖ and the truncation window within 1 %."
        ),
    ] = None,
) -> None:
    """Show why BPTT gradients vanish or explode: one row per spectral radius of W.

    On a random model and random tokens, W is rescaled to each --scale radius; the table gives the
    spectral norm of W, the saturated fraction of states, the gradient horizon (first lag where
    ‖Π diag(φ'_j) W‖₂ < --threshold, φ'_j = 1 − s_j² for tanh, 1[s_j > 0] for relu; "~N (fit)"
    extrapolates the fitted line when the sequence is too short to reach it), the fitted factor per
    step of that norm, ‖∂E/∂s0‖, and the smallest truncation window whose gradient is within 1 % of
    full BPTT.

    With --checkpoint, the trained model is measured as it is (one row, "ρ (model)" with ρ its own
    spectral radius) on B windows of T characters of its held-out text or of --data (targets: the
    next characters), or on B sequences of its copy/recall task; an explicit --scale rescales the
    trained W instead, and "model" among the radii keeps it. Windows and sequences come from --seed.
    A GRU, LSTM or IndRNN checkpoint gets the --cell table (one layer and one direction only; float64).
    """
    if cell is not None:  # the cells side by side (gpubptt.diagnostics.gated)
        ignored = {
            "checkpoint": checkpoint, "scale": scale, "data": data, "init": init, "layers": layers,
            "bidirectional": bidirectional, "nonlinearity": nonlinearity, "which": which,
        }  # fmt: skip
        if dtype is not DEFAULT_DTYPE:
            raise usage_error(f"--dtype {dtype.value} does not apply with --cell (the cells are compared in float64)")
        if iters != DEFAULT_ITERS:
            raise usage_error(
                f"--iters {iters} does not apply with --cell (it takes exact norms of dense Jacobian products)"
            )
        _compare_cells(cell, ignored, backend, plot, threshold, seq_len, hidden, batch, vocab, seed, fmt)
        return
    radii = _parse_scales(scale if scale is not None else ("model" if checkpoint is not None else RANDOM_SCALES))
    layers_or_exit(layers)
    if not (np.isfinite(threshold) and threshold > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {threshold}", param_hint="--threshold")
    if checkpoint is not None:
        checkpoint = which_checkpoint(checkpoint, which or WhichChoice.last)  # the last model, or --which best
    elif which is not None:
        raise usage_error(f"--which {which.value} picks one of a --checkpoint's two files: give --checkpoint")
    if checkpoint is not None:
        given = {
            "hidden": hidden, "vocab": vocab, "init": init, "layers": layers, "bidirectional": bidirectional,
            "nonlinearity": nonlinearity,
        }  # fmt: skip
        for name, value in given.items():
            if value is not None:
                raise usage_error(f"--{name} describes the random model; a checkpoint brings its own")
    elif data is not None:
        raise usage_error("--data needs --checkpoint: the model whose vocabulary encodes the text")
    check_plot(plot)
    writable_or_exit(plot, "--plot")
    readable_or_exit(data, "--data")
    distinct_or_exit({"--plot": plot}, {"--checkpoint": checkpoint, "--data": data})
    be = backend_or_exit(backend.value)
    if checkpoint is None:
        hidden = RANDOM_DEFAULTS["hidden"] if hidden is None else hidden
        vocab = RANDOM_DEFAULTS["vocab"] if vocab is None else vocab
        init = RANDOM_DEFAULTS["init"] if init is None else init
        T = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    try:
        if checkpoint is None:
            arch = dict(
                num_layers=layers or 1, bidirectional=bool(bidirectional),
                nonlinearity=(nonlinearity or NonlinearityChoice("tanh")).value,
            )  # fmt: skip
            problem = random_problem(
                T, hidden, batch, vocab, backend=be, dtype=dtype.value, init=init.value, seed=seed, **arch
            )
        else:
            problem = checkpoint_problem(
                checkpoint, T=seq_len, B=batch, seed=seed, backend=be, dtype=dtype.value, text=data
            )
    except InsufficientMemoryError as exc:
        sizes = "--seq-len or --batch" if checkpoint is not None else "--seq-len, --batch, --hidden or --vocab"
        raise usage_error(f"{exc}: choose a smaller {sizes}") from exc
    except InputError as exc:  # CheckpointError included
        raise usage_error(str(exc)) from exc
    except MemoryError as exc:
        raise out_of_memory(exc, be) from exc
    model, x, y = problem.model, problem.x, problem.y
    T = problem.T
    if model.cell_name != "rnn":  # a GRU/LSTM/IndRNN checkpoint: the cell measures (gpubptt.diagnostics.gated)
        if model.num_states > 1:
            arch = f"{model.num_layers} layer{'s' if model.num_layers > 1 else ''}"
            raise usage_error(
                f"{checkpoint.name} holds a {model.cell_name} model of {arch}"
                f"{', bidirectional' if model.bidirectional else ''}: {model.cell_name} checkpoints are measured "
                "with one layer and one direction only (stacks are measured for rnn cells only)"
            )
        if dtype is not DEFAULT_DTYPE:
            raise usage_error(
                f"--dtype {dtype.value} does not apply to a {model.cell_name} checkpoint (its table is measured in "
                "float64 on the host)"
            )
        if scale is not None:
            raise usage_error(f"--scale rescales an rnn cell's W; this checkpoint holds a {model.cell_name}")
        if iters != DEFAULT_ITERS:
            raise usage_error(
                f"--iters {iters} does not apply to a {model.cell_name} checkpoint (its table takes exact norms of "
                "dense Jacobian products)"
            )
        run_model(model, x, y, label=f"{checkpoint.name} ({model.cell_name})", threshold=threshold, fmt=fmt.value,
                  plot=plot)  # fmt: skip
        return
    settings = {"backend": be.name, "device": be.device, "T": T, "H": model.hidden_size, "B": batch}
    settings.update({k: v for k, v in problem.about.items() if k != "model"})
    settings.update({"dtype": dtype.value, "seed": seed, "threshold": threshold, "iters": iters})
    typer.echo("vanish: " + " ".join(f"{k}={v}" for k, v in settings.items() if k != "device"), err=True)
    if model.num_states > 1:  # a stack: per recurrence and through the stack
        title = f"{checkpoint.name if checkpoint else 'random model'}: T={T} H={model.hidden_size} B={batch} "
        title += f"L={model.num_layers}{' bidirectional' if model.bidirectional else ''} seed={seed} ({be.name})"
        try:
            _vanish_stack(
                model, x, y, radii, T=T, threshold=threshold, iters=iters, fmt=fmt, settings=settings, plot=plot,
                title=title,
            )  # fmt: skip
        except InputError as exc:
            raise usage_error(f"--scale: {exc}") from exc
        except MemoryError as exc:
            raise out_of_memory(exc, be) from exc
        return
    _vanish_one(model, x, y, radii, problem, settings, threshold, iters, fmt, plot, checkpoint, be, batch, seed)


def _vanish_one(model, x, y, radii, problem, settings, threshold, iters, fmt, plot, checkpoint, be, B, seed) -> None:
    """One recurrence: the sweep over the radii, as a table or JSON on stdout, and the plot."""
    T, batch = problem.T, B
    try:
        with _vanish_progress(len(radii)) as progress:
            sweep = diagnostics.vanish_sweep(model, x, y, radii, threshold=threshold, iters=iters, progress=progress)
    except InputError as exc:  # e.g. W rescaled past the dtype's range
        raise usage_error(f"--scale: {exc}") from exc
    except MemoryError as exc:
        raise out_of_memory(exc, be) from exc
    rescaled = [r is not None for r in radii]
    if fmt is VanishFormat.json:
        scales = [{"radius": r, "rescaled": rs, **rep.to_dict()} for (r, rep), rs in zip(sweep, rescaled, strict=True)]
        echo_out(json.dumps({"settings": settings, "scales": scales}, indent=1))
    else:
        head = ["ρ(W)", "‖W‖₂", "saturated", "horizon", "rate/step", "‖∂E/∂s0‖", "truncate@1%"]
        rows = [head] + [_vanish_row(r, rs, rep, T) for (r, rep), rs in zip(sweep, rescaled, strict=True)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            echo_out("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    if plot is not None:
        if checkpoint is None:
            about = problem.about
            title = (
                f"T={T} H={model.hidden_size} B={batch} vocab={about['vocab']} init={about['init']} "
                f"seed={seed} ({be.name})"
            )
        else:
            about = problem.about
            title = (
                f"{checkpoint.name} ({about['task']}, step {about['step']}) on {about['data']}: "
                f"T={T} H={model.hidden_size} B={batch} seed={seed} ({be.name})"
            )
        _write_plot(plot, lambda path: plots.plot_vanish(sweep, path, title=title))
