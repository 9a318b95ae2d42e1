"""How ``gpubptt train`` reports: settings and chance level, progress, checkpoints saved, and the summary."""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import typer

from .._io import sigint_deferred
from .._paths import write_error
from ..training.loop import TrainEvent
from ..training.record import CheckpointError
from ..training.run import (
    Run,
    best_path,
    save_run,
)
from ._common import (
    Failed,
    Interrupted,
    echo_out,
)


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
        #: --distributed: this rank's own TrainState (the run's moves at saves only), for the step in messages
        self.local_state = None

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
        copies = (self.best_checkpoint,) if best else ()
        # with the best file: both written, or neither (the temporaries are complete before either is replaced);
        # a Ctrl-C meanwhile waits until saved_step says what the files hold
        with sigint_deferred():
            try:
                save_run(self.checkpoint, self.run, copies=copies)
            except OSError as exc:
                if best:
                    what = f"checkpoint {str(self.checkpoint)!r} and its best file"
                    raise Failed(write_error(what, self.best_checkpoint, exc)) from exc
                raise Failed(write_error("checkpoint", self.checkpoint, exc)) from exc
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
        if self.saved_step is None:  # this run saved nothing: an earlier run's file (resumed or --force) as it was
            return f"{str(self.checkpoint)!r} is as it was" if self.checkpoint.exists() else "no checkpoint was saved"
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
        return {"chance": data.chance_loss, "title": title, "every_step": data.kind != "text"}

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
