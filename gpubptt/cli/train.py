"""``gpubptt train``: train a model with truncated BPTT (its reporting: ``_train_report``)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .. import plots
from .._paths import DestinationError, check_space
from ..cells import NONLINEARITIES
from ..errors import InputError
from ..model import CELLS, INITS
from ..training.data import TASKS
from ..training.loop import SCHEDULES
from ..training.loop import train as train_loop
from ..training.optim import DEFAULT_LR, ON_NONFINITE, OPTIMIZERS, NonFiniteError
from ..training.record import CheckpointError, checkpoint_bytes
from ..training.run import (
    DEFAULT_EVAL_EVERY,
    DEFAULT_STEPS,
    DEFAULTS,
    TEXT_CHUNK,
    best_path,
    new_run,
    resume_run,
)
from ..training.sizing import recompute_plan
from ._common import (
    EXIT_SAVED_NO_STDOUT,
    BackendChoice,
    DtypeChoice,
    Failed,
    Interrupted,
    PrecisionChoice,
    StdoutFailed,
    app,
    backend_or_exit,
    check_plot,
    choices,
    distinct_or_exit,
    in_flags,
    install_sigint,
    out_of_memory,
    parse_size,
    quiet_numerics,
    readable_or_exit,
    reflowed_help,
    restore_sigint,
    stderr_is_terminal,
    stdout_errors,
    usage_error,
    writable_or_exit,
    write_png,
)
from ._distributed import (
    DistributedChoice,
    abort_on_failure,
    communicator_or_exit,
    data_parallel_or_exit,
    train_data_parallel,
)
from ._train_report import TrainReporter

TaskChoice = choices("TaskChoice", TASKS)
InitChoice = choices("InitChoice", INITS)
NonlinearityChoice = choices("NonlinearityChoice", NONLINEARITIES)
CellChoice = choices("CellChoice", CELLS)
OptimizerChoice = choices("OptimizerChoice", OPTIMIZERS)
ScheduleChoice = choices("ScheduleChoice", SCHEDULES)
NonFiniteChoice = choices("NonFiniteChoice", ON_NONFINITE)
LR_DEFAULTS = ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())


def _default(text: str, setting: str) -> str:
    """An option's help with its default, read from ``run.DEFAULTS`` (the one place each default is written)."""
    value = DEFAULTS[setting]
    if isinstance(value, bool):
        shown = setting if value else f"no-{setting}"
    elif isinstance(value, float):
        shown = f"{value:g}"
    else:
        shown = value
    return f"{text} (default: {shown})"


def _destinations_or_exit(checkpoint: Path, plot: Path | None, data: Path | None, val_data: Path | None) -> Path:
    """The checkpoint's best file, once every file train writes can be written and every file it reads read
    (and none is another)."""
    writable_or_exit(plot, "--plot")
    writable_or_exit(checkpoint, "--checkpoint")  # before any work: training failed only at its first save
    best = best_path(checkpoint)
    if os.path.dirname(os.path.realpath(best)) == os.path.dirname(os.path.realpath(checkpoint)):
        readable_or_exit(best, "--checkpoint's best file")  # its folder was probed: only no folder or device there
    else:  # ck.npz or ck.best.npz is a link into another folder: probe that one too
        writable_or_exit(best, "--checkpoint's best file")
    readable_or_exit(data, "--data")
    readable_or_exit(val_data, "--val-data")
    distinct_or_exit(
        {"--checkpoint": checkpoint, "--checkpoint's best file": best, "--plot": plot},
        {"--data": data, "--val-data": val_data},
    )
    return best


def _early_stop_or_exit(early_stop: int | None, eval_every: int | None) -> None:
    """A usage error for --early-stop without evaluations to count (``eval_every`` 0; None: not known yet)."""
    if early_stop is not None and eval_every == 0:
        raise usage_error(
            "--early-stop counts held-out evaluations: give --eval-every ≥ 1 (0 evaluates only at the end)"
        )


def _flags_or_exit(
    checkpoint: Path, best: Path, *, resume: bool, force: bool, early_stop: int | None, eval_every: int | None,
    accept_changed_data: bool,
) -> None:  # fmt: skip
    """Usage errors for options that exclude or need each other, and for an earlier run's files that would be
    replaced without --resume or --force. ``eval_every`` None: a new run's default, a resumed run's own."""
    if resume and force:
        raise usage_error("--resume and --force exclude each other")
    if not resume and checkpoint.stem.endswith(".best"):  # another --checkpoint's best-model file (best_path)
        other = checkpoint.with_name(checkpoint.stem[: -len(".best")] + checkpoint.suffix)
        raise usage_error(
            f"--checkpoint {str(checkpoint)!r}: a name ending in .best{checkpoint.suffix} is where the run at "
            f"--checkpoint {str(other)!r} keeps its best model; choose another name (each run writes its best model "
            "beside its checkpoint as NAME.best.npz)"
        )
    _early_stop_or_exit(early_stop, DEFAULT_EVAL_EVERY if eval_every is None and not resume else eval_every)
    if accept_changed_data and not resume:
        raise usage_error("--accept-changed-data applies to --resume only (a new run reads its text afresh)")
    if checkpoint.exists() and not (resume or force):
        raise usage_error(
            f"{str(checkpoint)!r} exists: pass --resume to continue training it, --force to replace it, "
            "or choose another --checkpoint"
        )
    if best.exists() and not (resume or force):
        raise usage_error(
            f"{str(best)!r} exists (the best model of an earlier run at --checkpoint {str(checkpoint)!r}): pass "
            "--force to replace it with this run's, or choose another --checkpoint"
        )


def _train_or_exit(run, dp, reporter, checkpoint: Path, be, *, budget: int | None, early_stop: int | None) -> None:
    """Train ``run`` (on this rank's share under ``dp``), reporting each step; an interruption, a diverged
    or failed run saves what it can, says so and exits with its code."""
    state = run.state
    # --distributed: Ctrl-C reaches every rank, maybe between different steps: stop at once (the last checkpoint stays)
    previous_sigint = install_sigint(reporter.on_sigint) if dp is None else None
    reporter.start()
    try:
        if state.step < run.config.steps and dp is not None:
            train_data_parallel(dp, run, reporter, train_loop, max_memory=budget, early_stop=early_stop)
        elif state.step < run.config.steps:
            train_loop(
                run.model, run.data, run.optimizer, run.config, state=state, history=run.history,
                callback=reporter.on_step, max_memory=budget, early_stop=early_stop,
            )  # fmt: skip
    except Interrupted as exc:
        reporter.stop()
        try:
            reporter.save()
        except Failed as failed:
            typer.echo(f"interrupted at step {state.step}\nerror: {failed}; {reporter.kept()}", err=True)
            raise typer.Exit(failed.code) from exc
        except KeyboardInterrupt:  # a second Ctrl-C while saving: the write is atomic, the file is whole
            typer.echo(f"interrupted at step {state.step}, and again while saving; {reporter.kept()}", err=True)
            raise typer.Exit(130) from exc
        typer.echo(
            f"interrupted at step {state.step}; saved checkpoint {str(checkpoint)!r} at step {state.step} "
            "(continue with --resume)",
            err=True,
        )
        raise typer.Exit(130) from exc
    except KeyboardInterrupt as exc:
        reporter.stop()
        at = reporter.local_state or state  # under --distributed: this rank's step, not the save's
        typer.echo(f"interrupted during step {at.step + 1}, before it finished; {reporter.kept()}", err=True)
        raise typer.Exit(130) from exc
    except NonFiniteError as exc:
        reporter.stop()
        typer.echo(
            f"error: {in_flags(str(exc))}\n{reporter.kept()}",
            err=True,
        )
        raise typer.Exit(1) from exc
    except Failed as exc:  # a failed save at an evaluation: the file holds the previous save's step
        reporter.stop()
        typer.echo(f"error: {exc}; {reporter.kept()}", err=True)
        raise typer.Exit(exc.code) from exc
    except MemoryError as exc:
        reporter.stop()
        at = reporter.local_state or state
        typer.echo(f"training stopped during step {at.step + 1}; {reporter.kept()}", err=True)
        raise out_of_memory(exc, be) from exc
    except InputError as exc:  # e.g. weights grown past the dtype's range: the next check refuses them
        reporter.stop()
        at = reporter.local_state or state
        typer.echo(f"error: training stopped at step {at.step}: {in_flags(str(exc))}; {reporter.kept()}", err=True)
        raise typer.Exit(1) from exc
    finally:
        restore_sigint(previous_sigint)
        reporter.stop()


def _finish(run, reporter, checkpoint: Path, best: Path, plot: Path | None, *, resumed: bool, start_step: int,
            early_stop: int | None) -> None:  # fmt: skip
    """After the loop: say why it stopped early, save the run and its plot, and print the summary."""
    state, resume = run.state, resumed
    if state.step < run.config.steps and reporter.main:  # the loop returned early: --early-stop
        best_step, best_loss = run.history.best() or (None, float("nan"))
        typer.echo(
            f"early stop at step {state.step}: {early_stop} evaluations without a held-out loss below "
            f"{best_loss:.4f} (step {best_step}); {str(checkpoint)!r} keeps the last model (step {state.step}), "
            f"{str(best)!r} the best (step {best_step})",
            err=True,
        )
    try:
        if not resume or state.step != start_step:  # a resume with nothing to do leaves the file as it was
            reporter.save()
        if plot is not None and reporter.main:
            write_png(plot, "plot", lambda path: plots.plot_history(path, run.history, **reporter.plot_labels()))
    except Failed as exc:  # the final save (the file holds the last save's step), or the plot after it
        typer.echo(f"error: {exc}; {reporter.kept()}", err=True)
        raise typer.Exit(exc.code) from exc
    except KeyboardInterrupt as exc:  # during the final save (held until it was done) or the plot
        typer.echo(f"interrupted after step {state.step}, while saving; {reporter.kept()}", err=True)
        raise typer.Exit(130) from exc
    try:
        reporter.summary(plot)
    except StdoutFailed as exc:  # the run is saved: say so, with an exit code of its own
        exc.code = EXIT_SAVED_NO_STDOUT
        exc.kept = f"the checkpoint {str(checkpoint)!r} was saved at step {reporter.saved_step}"
        if plot is not None:
            exc.kept += f", and the plot {str(plot)!r} was written"
        raise


@app.command()
@quiet_numerics
@reflowed_help
@abort_on_failure
@stdout_errors  # inside: under --distributed a full stdout is an exit code for every rank, not a traceback
def train(
    task: Annotated[
        TaskChoice | None, typer.Option(help="text: next-character prediction; copy / recall: long-range memory tasks.")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="UTF-8 text file for --task text (default: a built-in generated corpus).")
    ] = None,
    val_data: Annotated[
        Path | None,
        typer.Option(help="Text: a UTF-8 file to evaluate on; all of --data then trains. (default: --val-fraction)"),
    ] = None,
    val_fraction: Annotated[
        float | None,
        typer.Option(help=_default("Text: the part of --data held out for evaluation (its end).", "val_fraction")),
    ] = None,
    delay: Annotated[
        int | None,
        typer.Option(help=_default("copy/recall: blanks between the symbols and the cue.", "delay")),
    ] = None,
    symbols: Annotated[int | None, typer.Option(help=_default("copy/recall: alphabet size A.", "symbols"))] = None,
    copy_length: Annotated[int | None, typer.Option(help=_default("copy: symbols to remember.", "copy_length"))] = None,
    hidden: Annotated[int | None, typer.Option(help=_default("Hidden size H.", "hidden"))] = None,
    cell: Annotated[
        CellChoice | None,
        typer.Option(
            help=_default(
                "The recurrent cell: torch.nn.RNN's (rnn), nn.GRU's (gru), nn.LSTM's (lstm) or IndRNN (indrnn).", "cell"
            )
        ),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(help=_default("Stacked recurrent layers (torch.nn.RNN's num_layers).", "layers"))
    ] = None,
    dropout: Annotated[
        float | None,
        typer.Option(
            help=_default("Dropout on the outputs of every layer but the last (needs --layers ≥ 2).", "dropout")
        ),
    ] = None,
    batch: Annotated[int | None, typer.Option(help=_default("Batch size B (parallel sequences).", "batch"))] = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            help="Truncated-BPTT chunk length, state carried across chunks; 0: whole sequences. "
            f"(default: {TEXT_CHUNK} for text, 0 for tasks)"
        ),
    ] = None,
    truncate: Annotated[
        int | None,
        typer.Option(help="Tutorial truncation inside each chunk (gradient through k+1 steps). (default: off)"),
    ] = None,
    backend: Annotated[BackendChoice, typer.Option(help="Backend to train on.")] = BackendChoice.auto,
    dtype: Annotated[DtypeChoice | None, typer.Option(help=_default("Floating-point type.", "dtype"))] = None,
    precision: Annotated[
        PrecisionChoice,
        typer.Option(
            help="GEMM operand precision, float32 models only: fp32, or tf32 / bf16 operands rounded to nearest "
            "even with float32 accumulation (weights, cell state and softmax stay float32). Like --backend, a "
            "setting of this call: a checkpoint does not record it."
        ),
    ] = PrecisionChoice.fp32,
    bias: Annotated[
        bool | None,
        typer.Option("--bias/--no-bias", help=_default("Biases b and c.", "bias")),
    ] = None,
    init: Annotated[InitChoice | None, typer.Option(help=_default("Weight initialisation.", "init"))] = None,
    nonlinearity: Annotated[
        NonlinearityChoice | None,
        typer.Option(
            help="φ of the recurrence s_t = φ(U x_t + W s_t−1 + b), as torch.nn.RNN's; --cell rnn or indrnn. "
            "(default: the cell's own: tanh for rnn, relu for indrnn)"
        ),
    ] = None,
    optimizer: Annotated[OptimizerChoice | None, typer.Option(help=_default("Optimizer.", "optimizer"))] = None,
    lr: Annotated[float | None, typer.Option(help=f"Learning rate. (default: {LR_DEFAULTS})")] = None,
    momentum: Annotated[float | None, typer.Option(help=_default("SGD momentum.", "momentum"))] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(
            help=_default(
                "Decoupled weight decay λ, as AdamW: θ ← θ − lr·λ·θ each step (any optimizer).", "weight_decay"
            )
        ),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(help=_default("Clip the global gradient norm to this; 0: off.", "clip")),
    ] = None,
    schedule: Annotated[
        ScheduleChoice | None, typer.Option(help=_default("Learning-rate schedule.", "schedule"))
    ] = None,
    warmup: Annotated[int | None, typer.Option(help=_default("Linear learning-rate warm-up steps.", "warmup"))] = None,
    steps: Annotated[
        int | None, typer.Option(help=f"Train until this many optimizer steps in total. (default: {DEFAULT_STEPS})")
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Text: train for this many passes over the training text instead of --steps.")
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            help=f"Steps between held-out evaluations (and checkpoint saves); 0: only at the end. (default: "
            f"{DEFAULT_EVAL_EVERY}; a resumed run keeps its own)"
        ),
    ] = None,
    early_stop: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Stop after this many held-out evaluations in a row without a new best loss (the best and the "
            "last models are both kept). (default: off)",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_default("Seed of the weights and the data order.", "seed"))] = None,
    on_nonfinite: Annotated[
        NonFiniteChoice | None,
        typer.Option(help=_default("A NaN/inf loss or gradient stops training (raise) or is skipped.", "on_nonfinite")),
    ] = None,
    checkpoint: Annotated[
        Path,
        typer.Option(
            help="Checkpoint file (.npz) of the last model, saved at every evaluation; the best held-out model "
            "goes beside it (ck.npz: ck.best.npz) whenever an evaluation improves."
        ),
    ] = Path("checkpoint.npz"),
    resume: Annotated[bool, typer.Option(help="Continue training the checkpoint (its settings apply).")] = False,
    accept_changed_data: Annotated[
        bool, typer.Option(help="With --resume: continue even though the training text changed since the save.")
    ] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing checkpoint with a new run.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write the loss curve to this PNG file (needs matplotlib).")] = None,
    distributed: Annotated[
        DistributedChoice,
        typer.Option(
            help="Under mpiexec: train one model on all ranks, each on its share of the --batch streams "
            "(mpi: mpi4py; nccl: NCCL between GPUs). Rank 0 prints and writes the checkpoint."
        ),
    ] = DistributedChoice.none,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget of one forward+BPTT (e.g. 512M, 8G): batches whose stored states exceed it "
            "(long whole sequences, --chunk 0) recompute them in segments; the gradient is the same."
        ),
    ] = None,
) -> None:
    """Train an RNN, GRU or LSTM with truncated BPTT; report the loss beside the chance level; save a checkpoint.

    With no options: a character model of a built-in generated English-like corpus, about a minute on a CPU.
    """
    options = dict(
        task=task, data=data, val_data=val_data, val_fraction=val_fraction, delay=delay, symbols=symbols,
        copy_length=copy_length, hidden=hidden, cell=cell,
        layers=layers,
        dropout=dropout, batch=batch,
        chunk=chunk, truncate=truncate, dtype=dtype, bias=bias, init=init, nonlinearity=nonlinearity,
        optimizer=optimizer, lr=lr,
        momentum=momentum, weight_decay=weight_decay, clip=clip,
        schedule=schedule, warmup=warmup, seed=seed, on_nonfinite=on_nonfinite,
    )  # fmt: skip
    given = {k: (v.value if isinstance(v, Enum) else v) for k, v in options.items() if v is not None}
    # first: under mpiexec every rank joins, so that a refusal below reaches all (data_parallel_or_exit agrees)
    comm = communicator_or_exit(distributed.value, backend.value)  # nccl/mpi pick this rank's GPU first
    check_plot(plot)
    budget = None if max_memory is None else parse_size(max_memory, "--max-memory")
    best = _destinations_or_exit(checkpoint, plot, data, val_data)
    if epochs is not None and not (math.isfinite(epochs) and epochs > 0):
        raise usage_error(f"--epochs must be a finite number > 0, got {epochs}")
    if precision is not PrecisionChoice.fp32 and dtype is not None and dtype.value != "float32":
        raise usage_error(
            f"--precision {precision.value} rounds float32 GEMMs; a --dtype {dtype.value} model runs fp32"
        )
    be = backend_or_exit(backend.value).with_precision(precision.value)  # the model takes the backend's precision
    _flags_or_exit(
        checkpoint, best, resume=resume, force=force, early_stop=early_stop, eval_every=eval_every,
        accept_changed_data=accept_changed_data,
    )  # fmt: skip
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
                max_memory=budget,
            )
        else:
            every = DEFAULT_EVAL_EVERY if eval_every is None else eval_every
            run = new_run(given, backend=be, steps=steps, epochs=epochs, eval_every=every, max_memory=budget)
    except (InputError, CheckpointError, TypeError) as exc:
        raise usage_error(in_flags(str(exc))) from exc
    except MemoryError as exc:
        raise out_of_memory(exc, be) from exc
    _early_stop_or_exit(early_stop, run.config.eval_every)  # a resumed run's own, now known; nothing written yet
    if run.model.precision != precision.value:  # a resumed float64 model: nothing is written yet
        raise usage_error(
            f"--precision {precision.value} rounds float32 GEMMs; the checkpoint's model is {run.model.dtype.name}"
        )
    left = run.state.step < run.config.steps  # a resumed run already at its end saves nothing: no room needed
    if comm.rank == 0 and left:  # the rank that writes: room for the checkpoint pair, or no training to lose
        try:
            size = checkpoint_bytes(
                run.model, optimizer=run.optimizer, vocab=getattr(run.data, "vocab", None), data=run.data.spec(),
                config=run.config, state=run.state, history=run.history,
            )  # fmt: skip
            check_space([checkpoint, best], size, f"--checkpoint {str(checkpoint)!r}",
                        "the checkpoint and its best file")  # fmt: skip
        except DestinationError as exc:
            raise usage_error(str(exc)) from exc

    # what every rank must share: the options given, and what they resolved to (a resumed rank's settings come
    # from its own checkpoint file), so that no rank trains on other settings, or stops at another step, silently
    m = run.model
    fingerprint = dict(given, steps=run.config.steps, eval_every=run.config.eval_every, resume=resume, backend=be.name,
                       precision=precision.value, early_stop=early_stop, config=asdict(run.config),
                       optimizer={"name": run.optimizer.name, **run.optimizer.hyperparameters()},
                       model=(m.cell.name, m.cell.options(), m.num_layers, m.bidirectional, m.dropout, m.bias),
                       state=(run.state.step, run.state.sequence, run.state.chunk), data=run.data.spec())  # fmt: skip
    dp = data_parallel_or_exit(comm, distributed.value, run, fingerprint)
    if budget is not None:  # each rank's plan is for its own streams
        try:
            plan = recompute_plan(run, budget, batch_size=None if dp is None else dp.local_batch, as_given=max_memory)
        except InputError as exc:
            raise usage_error(in_flags(str(exc))) from exc
        if comm.rank == 0:
            typer.echo(plan, err=True)
    if comm.rank == 0:
        for note in run.notes:
            typer.echo(f"note: {note}", err=True)
    reporter = TrainReporter(
        run, checkpoint, resumed=resume, interactive=stderr_is_terminal() and comm.rank == 0
    )  # fmt: skip
    if dp is not None:
        reporter.main, reporter.token_scale = comm.rank == 0, run.config.batch_size / dp.local_batch
    reporter.header()
    start_step = run.state.step
    _train_or_exit(run, dp, reporter, checkpoint, be, budget=budget, early_stop=early_stop)
    _finish(run, reporter, checkpoint, best, plot, resumed=resume, start_step=start_step, early_stop=early_stop)
