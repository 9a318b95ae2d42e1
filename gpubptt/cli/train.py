"""``gpubptt train`` and ``gpubptt sample``: train a model with truncated BPTT, and draw text from it."""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .. import plots
from .._paths import write_error
from ..cells import NONLINEARITIES
from ..errors import InputError
from ..model import CELLS, INITS
from ..training.data import TASKS
from ..training.loop import SCHEDULES, TrainEvent
from ..training.loop import train as train_loop
from ..training.optim import DEFAULT_LR, ON_NONFINITE, OPTIMIZERS, NonFiniteError
from ..training.record import CheckpointError, load_checkpoint
from ..training.run import (
    DEFAULT_EVAL_EVERY,
    DEFAULT_STEPS,
    DEFAULTS,
    TEXT_CHUNK,
    Run,
    best_path,
    new_run,
    recompute_plan,
    resume_run,
    save_run,
)
from ..training.sample import sample_chars
from ._common import (
    EXIT_SAVED_NO_STDOUT,
    BackendChoice,
    DtypeChoice,
    Failed,
    Interrupted,
    StdoutFailed,
    app,
    backend_or_exit,
    check_plot,
    choices,
    distinct_or_exit,
    echo_out,
    in_flags,
    install_sigint,
    out_of_memory,
    parse_size,
    quiet_numerics,
    readable_or_exit,
    reflowed_help,
    restore_sigint,
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


def describe(data: Any) -> tuple[str, str]:
    """(unit, chance-level text) for the summary line: the unit of the held-out loss."""
    if data.kind == "text":
        return "nats/char", (
            f"chance {data.chance_loss:.3f} = log {data.output_size}; letter frequencies alone {data.unigram_loss:.3f}"
        )
    return "nats/recalled symbol", f"chance {data.chance_loss:.3f} = log {data.A}; chance accuracy {1 / data.A:.1%}"


def train_loss_label(data: Any) -> str:
    """What the training loss averages: every character of text, but every step of a task's sequences (blanks
    included), unlike the task's held-out loss (the recalled symbols only): the two are labelled apart."""
    return "train loss" if data.kind == "text" else "train loss/step"


class TrainReporter:
    """How a training run reports: its settings and chance level first, progress while it trains (a bar
    on a terminal, one line per evaluation otherwise; stderr), and a summary at the end (stdout).

    ``on_step`` is the training loop's callback: it also saves the checkpoint at each evaluation,
    and stops the run between two steps once Ctrl-C was pressed (``on_sigint``).
    """

    def __init__(self, run: Run, checkpoint: Path, *, resumed: bool, interactive: bool) -> None:
        self.run, self.checkpoint, self.interactive = run, checkpoint, interactive
        self.best_checkpoint = best_path(checkpoint)
        self.best_written = resumed  # a new run (--force) removes a replaced run's best file at its first save
        self.unit, self.chance_text = describe(run.data)
        self.train_label = train_loss_label(run.data)
        self.last_eval: dict | None = None
        self.saved_step: int | None = run.state.step if resumed else None  # the step the file holds
        self.stop_requested = False
        self.window: deque = deque([(0.0, 0)], maxlen=50)  # (seconds, tokens so far): tokens/s over recent steps
        self.progress = None
        # --distributed: only rank 0 (main) prints and writes; sync gathers every rank's state before a save
        self.main, self.sync, self.token_scale = True, None, 1.0

    def header(self) -> None:
        if not self.main:
            return
        run, config, state = self.run, self.run.config, self.run.state
        typer.echo(
            f"{run.data!r} | {run.model!r} | {type(run.optimizer).__name__} lr={config.lr} | B={config.batch_size} "
            f"chunk={config.chunk or 'whole sequences'} | steps {state.step} → {config.steps}",
            err=True,
        )
        if run.data.kind == "text":
            typer.echo(f"loss in {self.unit}; {self.chance_text}", err=True)
        else:
            typer.echo(
                f"{self.train_label}: nats averaged over every step of a sequence (blanks included); held-out "
                f"loss in {self.unit} (the recall steps only); {self.chance_text}",
                err=True,
            )
        if state.step >= config.steps:
            typer.echo(
                f"the checkpoint is already at step {state.step} ≥ --steps {config.steps}; nothing to do", err=True
            )

    def start(self) -> None:
        """The progress bar, on a terminal."""
        if not self.interactive:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.bar = self.progress.add_task("train", total=self.run.config.steps, completed=self.run.state.step, info="")
        self.progress.start()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def save(self, *, best: bool = False) -> None:
        """Checkpoint the run (atomic: a failed write leaves the previous file as it was); Failed on an OSError.

        ``best``: this evaluation's held-out loss is the lowest yet: the best file gets the same run.
        """
        if self.sync is not None:
            self.sync()
        if not self.main:
            self.saved_step = self.run.state.step
            return
        targets = [("checkpoint", self.checkpoint)] + ([("best checkpoint", self.best_checkpoint)] if best else [])
        for what, path in targets:
            try:
                save_run(path, self.run)
            except OSError as exc:
                if path is self.best_checkpoint and not self.best_written:  # --force: never leave this run's
                    self.best_checkpoint.unlink(missing_ok=True)  # new last model beside a replaced run's best
                raise Failed(write_error(what, path, exc)) from exc
            except CheckpointError as exc:  # a run the format cannot hold: nothing was written
                raise Failed(str(exc)) from exc
        self.saved_step = self.run.state.step
        if best:
            self.best_written = True
        elif not self.best_written and self.best_checkpoint.exists():  # --force: not the best of this run
            try:
                self.best_checkpoint.unlink()
            except OSError as exc:
                raise Failed(write_error("best checkpoint", self.best_checkpoint, exc)) from exc
            self.best_written = True

    def kept(self) -> str:
        """What the checkpoint file holds now, in words."""
        if self.saved_step is None:
            return "no checkpoint was saved"
        return f"{str(self.checkpoint)!r} keeps step {self.saved_step}"

    def on_sigint(self, signum: int, frame: object) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, mid-step
        self.stop_requested = True
        typer.echo("\nCtrl-C: stopping after this step and saving (Ctrl-C again to stop at once)", err=True)

    def on_step(self, ev: TrainEvent) -> None:
        window = self.window
        window.append((ev.seconds, window[-1][1] + ev.tokens * self.token_scale))
        rate = (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-9)
        loss_s = "nan" if ev.loss is None else f"{ev.loss:.3f}"
        if ev.eval is not None:
            self.last_eval = ev.eval
            self.save(best=ev.best)  # between steps: the weights and the state are consistent
            line = (
                f"step {ev.step}/{ev.total}  {self.train_label} {loss_s}  held-out {ev.eval['loss']:.3f} "
                f"(chance {ev.eval['chance']:.3f})  acc {ev.eval['accuracy']:.1%}  |g| {ev.grad_norm:.2f}  "
                f"{rate:,.0f} tok/s" + ("  best so far" if ev.best else "")
            )
            if self.progress is not None:
                self.progress.console.print(line, highlight=False)
            elif self.main:
                typer.echo(line, err=True)
        if self.progress is not None:
            info = f"{self.train_label} {loss_s}  |g| {ev.grad_norm:.2f}  {rate:,.0f} tok/s"
            self.progress.update(self.bar, completed=ev.step, info=info)
        if self.stop_requested:
            raise Interrupted  # between steps: the weights and the state are consistent

    def plot_labels(self) -> dict:
        """The loss curve's chance level and title."""
        data, run = self.run.data, self.run
        layers = f" × {run.model.num_layers} layers" if run.model.num_layers > 1 else ""
        title = f"{data.kind} | H={run.model.hidden_size}{layers} | {type(run.optimizer).__name__}"
        if data.kind != "text":
            title += f" | delay {data.delay}"
        return {"chance": data.chance_loss, "title": title}

    def summary(self, plot: Path | None) -> None:
        if not self.main:
            return
        history, state = self.run.history, self.run.state
        ev = self.last_eval or {"loss": float("nan"), "accuracy": float("nan")}
        if history.eval_step and self.last_eval is None:
            ev = {"loss": history.eval_loss[-1], "accuracy": history.eval_accuracy[-1]}
        train_loss = history.loss[-1] if history.loss else float("nan")
        echo_out(
            f"step {state.step}: {self.train_label} {train_loss:.4f}, held-out loss {ev['loss']:.4f} {self.unit} "
            f"(accuracy {ev['accuracy']:.1%}); {self.chance_text}"
        )
        best = history.best()
        if best is not None:
            echo_out(f"best model: step {best[0]}, held-out {best[1]:.4f} {self.unit}: {self.best_checkpoint}")
        if history.skipped:
            echo_out(f"{history.skipped} steps were skipped for a non-finite loss or gradient")
        echo_out(f"checkpoint: {self.checkpoint}" + (f"\nplot: {plot}" if plot is not None else ""))


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


def _flags_or_exit(
    checkpoint: Path, best: Path, *, resume: bool, force: bool, early_stop: int | None, eval_every: int,
    accept_changed_data: bool,
) -> None:  # fmt: skip
    """Usage errors for options that exclude or need each other, and for an earlier run's files that would be
    replaced without --resume or --force."""
    if resume and force:
        raise usage_error("--resume and --force exclude each other")
    if early_stop is not None and eval_every == 0:
        raise usage_error(
            "--early-stop counts held-out evaluations: give --eval-every ≥ 1 (0 evaluates only at the end)"
        )
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
            typer.echo(f"interrupted at step {state.step}\nerror: {failed}", err=True)
            raise typer.Exit(failed.code) from exc
        typer.echo(
            f"interrupted at step {state.step}; saved checkpoint {str(checkpoint)!r} at step {state.step} "
            "(continue with --resume)",
            err=True,
        )
        raise typer.Exit(130) from exc
    except KeyboardInterrupt as exc:
        reporter.stop()
        typer.echo(f"interrupted during step {state.step + 1}, before it finished; {reporter.kept()}", err=True)
        raise typer.Exit(130) from exc
    except NonFiniteError as exc:
        reporter.stop()
        typer.echo(
            f"error: {in_flags(str(exc))}\n{str(checkpoint)!r} keeps the last evaluation's checkpoint, if any",
            err=True,
        )
        raise typer.Exit(1) from exc
    except Failed as exc:
        reporter.stop()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
    except MemoryError as exc:
        reporter.stop()
        typer.echo(f"training stopped during step {state.step + 1}; {reporter.kept()}", err=True)
        raise out_of_memory(exc, be) from exc
    except InputError as exc:  # e.g. weights grown past the dtype's range: the next check refuses them
        reporter.stop()
        typer.echo(f"error: training stopped at step {state.step}: {in_flags(str(exc))}; {reporter.kept()}", err=True)
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
    except Failed as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.code) from exc
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
    bias: Annotated[
        bool | None,
        typer.Option("--bias/--no-bias", help=_default("Biases b and c.", "bias")),
    ] = None,
    init: Annotated[InitChoice | None, typer.Option(help=_default("Weight initialisation.", "init"))] = None,
    nonlinearity: Annotated[
        NonlinearityChoice | None,
        typer.Option(
            help=_default("φ of the recurrence s_t = φ(U x_t + W s_t−1 + b), as torch.nn.RNN's.", "nonlinearity")
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
        int, typer.Option(help="Steps between held-out evaluations (and checkpoint saves).")
    ] = DEFAULT_EVAL_EVERY,
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
    be = backend_or_exit(backend.value)
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
            )
        else:
            run = new_run(given, backend=be, steps=steps, epochs=epochs, eval_every=eval_every)
    except (InputError, CheckpointError, TypeError) as exc:
        raise usage_error(in_flags(str(exc))) from exc
    except MemoryError as exc:
        raise out_of_memory(exc, be) from exc

    fingerprint = dict(given, steps=run.config.steps, eval_every=eval_every, resume=resume, backend=be.name,
                       state=(run.state.step, run.state.sequence, run.state.chunk), data=run.data.spec())  # fmt: skip
    dp = data_parallel_or_exit(comm, distributed.value, run, fingerprint)
    if budget is not None:  # each rank's plan is for its own streams
        try:
            plan = recompute_plan(run, budget, batch_size=None if dp is None else dp.local_batch, as_given=max_memory)
        except InputError as exc:
            raise usage_error(in_flags(str(exc))) from exc
        if comm.rank == 0:
            typer.echo(plan, err=True)
    reporter = TrainReporter(
        run, checkpoint, resumed=resume, interactive=sys.stderr.isatty() and comm.rank == 0
    )  # fmt: skip
    if dp is not None:
        reporter.main, reporter.token_scale = comm.rank == 0, run.config.batch_size / dp.local_batch
    reporter.header()
    start_step = run.state.step
    _train_or_exit(run, dp, reporter, checkpoint, be, budget=budget, early_stop=early_stop)
    _finish(run, reporter, checkpoint, best, plot, resumed=resume, start_step=start_step, early_stop=early_stop)


class WhichChoice(str, Enum):
    """Which of a run's two checkpoints: the last model (the file named) or the best held-out one beside it."""

    last = "last"
    best = "best"


def which_checkpoint(checkpoint: Path, which: WhichChoice) -> Path:
    """The file ``--which`` selects, checked readable: ``checkpoint`` itself (last) or its best file (best)."""
    if which is WhichChoice.last:
        readable_or_exit(checkpoint, "--checkpoint")
        return checkpoint
    best = best_path(checkpoint)
    if not best.exists():
        raise usage_error(
            f"--which best: {str(best)!r} does not exist (`gpubptt train --checkpoint {checkpoint}` writes it at the "
            "first held-out evaluation after training began); use --which last for the last model"
        )
    readable_or_exit(best, "--checkpoint's best file")
    return best


WHICH_HELP = "last: the --checkpoint file itself; best: the best held-out model saved beside it (ck.best.npz)."


@app.command()
@stdout_errors
@quiet_numerics
@reflowed_help
def sample(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint of a text model (from `gpubptt train`).")] = Path(
        "checkpoint.npz"
    ),
    which: Annotated[WhichChoice, typer.Option(help=WHICH_HELP)] = WhichChoice.last,
    length: Annotated[int, typer.Option(help="Characters to generate.")] = 500,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature: < 1 surer, > 1 more random; 0: greedy.")
    ] = 1.0,
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Draw among the K most likely characters only. (default: all)")
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="Draw among the fewest most likely characters whose probability reaches P (0 < P ≤ 1)."),
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Take the most likely character every step (as --temperature 0).")
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the sampler (an int ≥ 0).")] = 0,
    prime: Annotated[str, typer.Option(help="Text to start from (its characters must be in the vocabulary).")] = "",
) -> None:
    """Generate text from a trained character model, printed to stdout as each character is drawn."""
    checkpoint = which_checkpoint(checkpoint, which)
    distinct_or_exit({}, {"--checkpoint": checkpoint})  # `>> ck.npz` would append the text to the checkpoint
    if length < 0:
        raise usage_error(f"--length must be ≥ 0, got {length}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise usage_error(f"--temperature must be a number ≥ 0 (0: greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise usage_error(f"--top-p must be a number in (0, 1], got {top_p}")
    try:
        ck = load_checkpoint(checkpoint, backend="numpy")
        if ck.vocab is None:
            kind = (ck.data or {}).get("kind", "unknown")
            raise usage_error(f"{str(checkpoint)!r} was trained on the {kind} task; sampling needs a text model")
        chars = sample_chars(
            ck.model, ck.vocab, length=length, temperature=temperature, seed=seed, prime=prime, top_k=top_k,
            top_p=top_p, greedy=greedy,
        )  # fmt: skip
    except (InputError, CheckpointError) as exc:  # every argument is checked before the first character
        raise usage_error(str(exc)) from exc
    n = 0
    try:
        for ch in chars:
            echo_out(ch, nl=False)  # flushed: the text appears as it is drawn
            n += len(ch)
        echo_out("")
    except KeyboardInterrupt as exc:
        typer.echo("")
        typer.echo(f"interrupted after {n} of {len(prime) + length} characters", err=True)
        raise typer.Exit(130) from exc
    except StdoutFailed as exc:  # `| head` ends quietly (stdout_errors); a full disk is named
        exc.kept = f"stopped after {n} of {len(prime) + length} characters"
        raise
