"""The training loop: batches of sequences, chunked truncated BPTT, a learning-rate schedule, evaluation.

Each data set hands out numbered batches of whole sequences (L, B). The loop cuts a sequence into
chunks of ``chunk`` steps and runs one optimizer step per chunk (the stateful scheme, "truncated
BPTT" as used to train on long streams):

    s ← 0
    for each chunk (x_c, y_c) of the sequence:
        E, grads = model.loss_and_grads(x_c, y_c, s0=s, truncate=k)     # BPTT inside the chunk only
        s ← final state of the chunk                                      # carried forward, not backpropagated
        θ ← optimizer(θ, clip(grads))

``chunk=None`` backpropagates through whole sequences (full BPTT); ``truncate=k`` adds the
tutorial truncation inside each chunk. The loss is the mean over the chunk's B·T steps.

The carried state is the chunk's final state, which ``loss_and_grads(..., return_final_state=True)``
returns at no extra cost.

Nothing here prints: progress goes to ``callback(event)``. There is one host sync per step (the
optimizer's finiteness guard, which also reads the loss and gradient norm) and one per evaluation.
On NumPy the loop is deterministic: the same seed gives the same weights, and a run resumed from
a checkpoint continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._io import sigint_deferred
from ..errors import InputError, InputTypeError
from ..validation import check_positive_int
from ._optim_settings import LR_MAX, LR_RANGE, in_float_range
from .data import seed_words
from .optim import NonFiniteError, Optimizer, clip_grad_norm

__all__ = [
    "SCHEDULES",
    "History",
    "TrainConfig",
    "TrainEvent",
    "TrainState",
    "evaluate",
    "learning_rate",
    "optimizer_base_rate",
    "train",
]

SCHEDULES = ("constant", "cosine", "step")


def optimizer_base_rate(optimizer: Optimizer, step: int, config: TrainConfig) -> float | None:
    """The base rate of ``config``'s schedule that ``optimizer`` tells, for a run at ``step`` with no ``config.lr``:
    its ``base_lr`` at the start, its rate past warm-up under a constant schedule; None where its rate is the
    last step's scheduled one, not the base (a schedule, or within warm-up)."""
    if step == 0:
        return float(optimizer.base_lr)
    if config.schedule != "constant" or step < config.warmup:
        return None
    return float(optimizer.lr)


def learning_rate(step: int, *, base_lr: float, schedule: str, total_steps: int, warmup: int = 0) -> float:
    """The learning rate for step ``step`` (0-based) of ``total_steps``.

    constant: base_lr. cosine: from base_lr down to base_lr/10 along half a cosine. step: halved
    after each quarter of the run. warmup: a linear ramp from base_lr/warmup over the first steps.
    """
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    if schedule == "step":
        return base_lr * 0.5 ** min(3, int(frac * 4))
    return base_lr


@dataclass
class TrainConfig:
    """How to train. steps: total optimizer steps; chunk: BPTT chunk length (None: whole sequences; on a copy or
    recall task it must divide the sequence or be no shorter, or ``train`` refuses it: the default 64 often does not);
    truncate: tutorial truncation inside a chunk (None: none); max_norm: global-norm clipping (None: off);
    lr: the schedule's base learning rate, set on the optimizer before every step (None: the optimizer's rate,
    ``Optimizer.base_lr``: as built (its name's default in ``make_optimizer``, or the one given there) or as set
    by hand on ``optimizer.lr`` before ``train``, not the last rate an earlier run's schedule left there, also
    after a save and load: ``state_dict`` keeps it);
    eval_every: steps between evaluations (0: only at the end). NumPy integers and floats are taken as
    Python's (the configuration is stored as JSON in checkpoints)."""

    steps: int = 1000
    batch_size: int = 32
    chunk: int | None = 64
    truncate: int | None = None
    max_norm: float | None = 5.0
    lr: float | None = None
    schedule: str = "constant"
    warmup: int = 0
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        def pos_int(name: str, v: Any, lo: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{name} must be an int ≥ {lo}, got {v!r}")

        pos_int("steps", self.steps)
        pos_int("batch_size", self.batch_size)
        pos_int("eval_every", self.eval_every, 0)
        pos_int("warmup", self.warmup, 0)
        pos_int("seed", self.seed, 0)
        if self.chunk is not None:
            pos_int("chunk", self.chunk)
        if self.truncate is not None:
            pos_int("truncate", self.truncate, 0)
        for name in ("max_norm", "lr"):  # the type first: the ranges below compare numbers
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))):
                raise InputError(f"{name} must be a number or None, got {v!r}")
        if self.max_norm is not None and not (in_float_range(self.max_norm) and self.max_norm > 0):
            raise InputError(f"max_norm must be a positive number or None, got {self.max_norm}")
        if self.lr is not None and not (in_float_range(self.lr) and 0 < self.lr <= LR_MAX):
            raise InputError(f"lr must be a finite number in (0, {LR_MAX:g}] or None, got {self.lr}; {LR_RANGE}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        for name in ("steps", "batch_size", "chunk", "truncate", "warmup", "eval_every", "seed"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in ("max_norm", "lr"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))


@dataclass
class TrainState:
    """Where the loop stands: steps done, the sequence batch and chunk to run next, the carried state s
    ((B, H), or (L·dirs, B, H) for a stack)."""

    step: int = 0
    sequence: int = 0
    chunk: int = 0
    s: Any = None


@dataclass
class History:
    """Per-step training loss/gradient norm/lr (host floats) and the evaluations."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    skipped: int = 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """NumPy arrays keyed by field name (for checkpoints)."""
        ints = ("step", "eval_step")
        out = {k: np.asarray(getattr(self, k), dtype=np.int64 if k in ints else np.float64) for k in self._lists()}
        out["skipped"] = np.asarray(self.skipped, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> History:
        h = cls(**{k: [x.item() for x in np.asarray(arrays[k]).ravel()] for k in cls._lists()})
        h.skipped = int(arrays["skipped"])
        return h

    def best(self) -> tuple[int, float] | None:
        """(step, loss) of the lowest finite held-out loss after training began (step ≥ 1; the first of
        equal ones), or None before any such evaluation. The untrained model at step 0 is no candidate."""
        found = None
        for step, loss in zip(self.eval_step, self.eval_loss, strict=True):
            if step >= 1 and math.isfinite(loss) and (found is None or loss < found[1]):
                found = (step, loss)
        return found

    def evals_since_best(self) -> int:
        """Evaluations after the best one (``best``) that did not improve on it; all of them when there is none."""
        best = self.best()
        return sum(1 for step in self.eval_step if step >= 1 and (best is None or step > best[0]))

    @staticmethod
    def _lists() -> tuple[str, ...]:
        return ("step", "loss", "grad_norm", "lr", "eval_step", "eval_loss", "eval_accuracy")


@dataclass(frozen=True)
class TrainEvent:
    """Sent to the callback after every step. loss is the chunk's mean loss (nats/step); grad_norm
    the global norm before clipping; tokens the B·T steps of the chunk; seconds of training since the loop
    began (evaluations excluded);
    eval the evaluation run at this step, if any; best: whether that evaluation's loss is the lowest so far
    (``History.best``: the model to keep as the best one)."""

    step: int
    total: int
    loss: float | None
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    applied: bool
    eval: dict[str, float] | None = None
    best: bool = False


def dropout_seed(seed: int, step: int) -> int:
    """The seed of the dropout masks of optimizer step ``step`` of a run seeded with ``seed`` (an int ≥ 0)."""
    lo, hi = (int(v) for v in np.random.SeedSequence(seed_words(seed, step)).generate_state(2, np.uint32))
    return (hi & 0x7FFFFFFF) << 32 | lo  # 63 bits: fits the int64 a seed may be stored as


def _diverged(model: Any) -> str:
    """Why an evaluation's carried state is not finite: the weights run the states into NaN or infinity."""
    xp = model.backend.xp
    big = max(float(model.backend.to_numpy(xp.abs(p).max())) for p in model.params.values())  # failure path only
    return (
        f"evaluation: the model's states overflow to NaN or infinity, with finite weights up to |{big:.3g}| "
        f"({model.dtype.name}): the weights diverged; lower the learning rate or clip the gradients (max_norm)"
    )


def _check_loop_model(model: Any, what: str) -> None:
    """InputError for a model the loop cannot feed: another head than the per-step softmax (the loop scores next-
    symbol targets), or ``batch_first`` (its batches are time-major (T, B))."""
    head = getattr(model, "head", "softmax")
    if head != "softmax":
        raise InputError(
            f"{what} trains and scores the per-step softmax head (next-symbol targets); model.head is {head!r}: set "
            "model.head = 'softmax', or write the loop with loss_and_grads(..., head=...) and an optimizer"
        )
    if getattr(model, "batch_first", False):
        raise InputError(
            f"{what} feeds time-major (T, B) batches, and model.batch_first reads them as (B, T): set "
            "model.batch_first = False while training (the weights are the same)"
        )


def evaluate(
    model: Any,
    data: Any,
    *,
    chunk: int = 256,
    batch_size: int | None = None,
    reduce: Callable[[Any], None] | None = None,
) -> dict[str, float]:
    """Loss and accuracy of the model on the data's held-out sequences (one host sync at the end).

    Returns {"loss": mean nats per scored step, "accuracy": argmax accuracy there, "chance": the data's
    closed-form chance level for that loss, "loss_all": mean over every step}. Scored steps are the
    data's ``score_mask`` (the recall steps of a task; every step of text). Sequences are run in
    chunks with the state carried, as in training. ``reduce(buf)`` sums the five running totals
    (a float64 (5,) array on the backend) in place over processes before they are read
    (``gpubptt.distributed``: each process evaluates its share of the streams). Weights that run the
    carried state into NaN or infinity raise NonFiniteError saying so (not a complaint about s0).
    """
    chunk = check_positive_int(chunk, "chunk")  # range() would refuse 0 and 2.5 in its own words, and run True as 1
    _check_loop_model(model, "evaluate()")
    be = model.backend
    xp = be.xp
    seqs = data.eval_sequences() if batch_size is None else data.eval_sequences(batch_size=batch_size)
    mask = data.score_mask
    tot = xp.zeros(4, dtype=xp.float64)  # [Σ scored nll, Σ scored correct, n scored, Σ all nll]
    n_all = 0
    for x_host, y_host in seqs:
        s = None
        L = x_host.shape[0]
        for t0 in range(0, L, chunk):
            xc, yc = be.asarray(x_host[t0 : t0 + chunk]), be.asarray(y_host[t0 : t0 + chunk])
            try:
                out = model.forward(xc, s)
            except InputError:
                if s is None or all(bool(xp.isfinite(a).all()) for a in (s if isinstance(s, tuple) else (s,))):
                    raise
                raise NonFiniteError(_diverged(model)) from None  # the carried state, not the caller's input
            s = out.final_state
            p_y = xp.take_along_axis(out.probs, yc[:, :, None], axis=2)[:, :, 0]  # ŷ_t[y_t], (T, B)
            nll = -xp.log(xp.maximum(p_y, np.finfo(model.dtype).tiny))
            correct = (xp.argmax(out.probs, axis=2) == yc).astype(xp.float64)
            m = (
                xp.ones(nll.shape[0], dtype=xp.float64)
                if mask is None
                else be.asarray(mask[t0 : t0 + chunk], dtype=xp.float64)
            )
            tot += xp.stack(
                [(nll * m[:, None]).sum(), (correct * m[:, None]).sum(), m.sum() * nll.shape[1], nll.sum()]
            ).astype(xp.float64)
            n_all += nll.size
    if reduce is not None:
        tot = xp.concatenate([tot, xp.asarray([n_all], dtype=xp.float64)])  # (5,): n_all travels too
        reduce(tot)
        n_all = tot[4]
    nll_s, correct_s, n_s, nll_all = be.to_numpy(tot[:4]).tolist()  # the one host sync
    n_all = float(n_all)
    return {
        "loss": nll_s / n_s,
        "accuracy": correct_s / n_s,
        "chance": data.chance_loss,
        "loss_all": nll_all / n_all,
    }


def train(
    model: Any,
    data: Any,
    optimizer: Optimizer,
    config: TrainConfig,
    *,
    state: TrainState | None = None,
    history: History | None = None,
    callback: Callable[[TrainEvent], None] | None = None,
    grad_hook: Callable[[Any, dict[str, Any]], Any] | None = None,
    evaluator: Callable[[Any, Any], dict[str, float]] | None = None,
    max_memory: int | None = None,
    early_stop: int | None = None,
) -> tuple[TrainState, History]:
    """Train ``model`` on ``data`` until ``config.steps`` optimizer steps are done; update it in place.

    x, y batches (L, B) come from ``data.train_sequence(i, ...)``, cut into chunks (T, B) with
    T = config.chunk. ``state``/``history`` continue an earlier run (from a checkpoint, or a call that stopped: one
    interrupted in a step's evaluation, after the step itself, runs that evaluation first, into the history;
    the callback gets no event for it). A Ctrl-C during a step's update is delivered once the step is counted.
    Returns the final state and history. The optimizer must hold the model's parameters; one built on the mapping
    ``model.params`` projects every step's new values with the model's ``constrain`` (IndRNN's |w| bound), as one built
    on the model.

    ``grad_hook(loss, grads)`` runs after each ``loss_and_grads`` and before clipping and the
    update: it may change the gradients in place (e.g. sum them over processes) and returns the
    loss to record and check (a 0-d array), or None to keep it. loss is 0-d; grads as returned by
    ``loss_and_grads`` (shaped like the parameters, plus "s0" (B, H)).

    ``evaluator(model, data)`` replaces ``evaluate`` for the held-out evaluations (e.g. one that
    splits them over processes, ``gpubptt.distributed.DataParallel.evaluate``).
    ``max_memory`` (bytes): each ``loss_and_grads`` keeps every state where its estimate fits and
    otherwise recomputes them in segments (``recompute="auto"``, the same exact gradient).
    ``early_stop`` (patience, an int ≥ 1): stop after the evaluation (and its callback) that makes
    ``early_stop`` evaluations in a row without a lower held-out loss than the best
    (``History.evals_since_best``, counted over the whole history, so a resumed run keeps its count);
    the returned ``state.step`` is then below ``config.steps``.

    The schedule's base rate is ``config.lr``; where it is None, the optimizer's ``base_lr`` (``TrainConfig``);
    ``config`` itself is not changed. A run continued from a checkpoint with ``config.lr`` None under a
    schedule, or in its warm-up, is refused (InputError): a loaded optimizer holds the last step's scheduled
    rate, not the base.
    """
    if not isinstance(config, TrainConfig):
        raise InputTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_loop_model(model, "train()")
    config = dataclasses.replace(config)  # its checks again, on a copy: a field set after construction (steps="3")
    if early_stop is not None:
        if isinstance(early_stop, bool) or not isinstance(early_stop, (int, np.integer)) or early_stop < 1:
            raise InputError(
                f"early_stop must be an int ≥ 1 (evaluations without improvement) or None, got {early_stop!r}"
            )
        early_stop = int(early_stop)
    if optimizer.params is not model.params:
        raise InputError("the optimizer must be built on this model's parameters (make_optimizer(name, model))")
    if optimizer.constrain is None:  # built on the mapping model.params: the cell's constraint (IndRNN's |w|
        optimizer.constrain = getattr(model, "constrain", None)  # bound) still holds after every training step
    data.check_batch(config.batch_size, config.chunk or 1)
    if model.input_size != data.input_size or model.output_size != data.output_size:
        raise InputError(
            f"the model has D={model.input_size}, K={model.output_size} but the data needs "
            f"D={data.input_size}, K={data.output_size}"
        )
    be, xp = model.backend, model.backend.xp
    state = TrainState() if state is None else state
    history = History() if history is None else history
    n_states = getattr(model, "num_states", 1)
    lead = () if n_states == 1 else (n_states,)  # one recurrence: (B, H); a stack: (L·dirs, B, H)
    want = (*lead, config.batch_size, model.hidden_size)
    tupled = bool(getattr(getattr(model, "cell", None), "extra_state", False))  # an LSTM's state: the tuple (h, c)
    if state.s is not None and isinstance(state.s, tuple) != tupled:
        name = getattr(model, "cell_name", "rnn")
        raise InputError(f"the carried state of a {name} model must {'' if tupled else 'not '}be a tuple (h, c)")
    for s in state.s if isinstance(state.s, tuple) else (state.s,):
        if s is not None and tuple(s.shape) != want:
            layout = "(B, H)" if n_states == 1 else "(L·dirs, B, H)"
            raise InputError(f"carried state has shape {tuple(s.shape)}, expected {layout} = {want}")
    if isinstance(state.s, tuple):
        state.s = tuple(be.asarray(s, dtype=model.dtype) for s in state.s)
    elif state.s is not None:
        state.s = be.asarray(state.s, dtype=model.dtype)

    base_lr = config.lr
    if base_lr is None:  # the optimizer's rate; the caller's config is left as it is
        at = state.step
        if at == 0 and optimizer.lr != optimizer.scheduled_lr:  # as built, or set by hand: this run's base
            optimizer.base_lr = float(optimizer.lr)
        base_lr = optimizer_base_rate(optimizer, at, config)
        if base_lr is None:
            raise InputError(
                f"config.lr is None (the optimizer's rate) but the run continues at step {at} under the "
                f"{config.schedule!r} schedule{' in its warm-up' if at < config.warmup else ''}: the optimizer holds "
                "the last step's scheduled rate; give TrainConfig(lr=...) the schedule's base rate"
            )

    eval_seconds = [0.0]

    def run_eval(step: int) -> dict[str, float]:
        t = time.perf_counter()
        try:
            ev = (evaluate if evaluator is None else evaluator)(model, data)
        except NonFiniteError as exc:
            raise NonFiniteError(f"step {step}: {exc}") from None
        eval_seconds[0] += time.perf_counter() - t
        history.eval_step.append(step)
        history.eval_loss.append(ev["loss"])
        history.eval_accuracy.append(ev["accuracy"])
        return ev

    def due(step: int) -> bool:  # whether step ends with a held-out evaluation
        return bool(config.eval_every and step % config.eval_every == 0) or step == config.steps

    if config.eval_every and state.step == 0 and not history.eval_step:
        run_eval(0)
    elif history.step[-1:] == [state.step] and due(state.step) and history.eval_step[-1:] != [state.step]:
        run_eval(state.step)  # an earlier call recorded this step, then stopped in its evaluation: owed, run first
        if early_stop is not None and history.evals_since_best() >= early_stop:
            return state, history  # where that call would have stopped
    t_start = time.perf_counter()
    eval_seconds[0] = 0.0
    cached: tuple[int, np.ndarray, np.ndarray] | None = None
    while state.step < config.steps:
        if cached is None or cached[0] != state.sequence:
            x_host, y_host = data.train_sequence(
                state.sequence, seed=config.seed, batch_size=config.batch_size, chunk=config.chunk or 1
            )
            cached = (state.sequence, x_host, y_host)
        _, x_host, y_host = cached
        L = x_host.shape[0]
        T = config.chunk or L
        # whole chunks only: a fixed (T, B) lets a GPU replay one captured graph; the random offset of
        # each epoch moves the boundaries, so most of a dropped tail is seen in other epochs (a few
        # characters at the ends of the later streams may never be: docs/training.md)
        n_chunks = max(1, L // T)
        if state.chunk >= n_chunks:  # next sequence: the state starts from zero again
            state.sequence, state.chunk, state.s = state.sequence + 1, 0, None
            continue
        t0 = state.chunk * T
        xc, yc = be.asarray(x_host[t0 : t0 + T]), be.asarray(y_host[t0 : t0 + T])

        # dropout masks from (seed, step): a resumed run draws the masks the uninterrupted one would have
        drop = {"dropout_seed": dropout_seed(config.seed, state.step)} if getattr(model, "dropout", 0) else {}
        if max_memory is not None:
            drop.update(recompute="auto", max_memory=max_memory)
        loss, grads, s_last = model.loss_and_grads(
            xc, yc, state.s, truncate=config.truncate, reduction="mean", return_final_state=True, **drop
        )
        if grad_hook is not None:
            hooked = grad_hook(loss, grads)
            loss = loss if hooked is None else hooked
        last = state.chunk + 1 == n_chunks
        s_next = None if last else s_last  # computed with the weights that ran this chunk
        norm = clip_grad_norm(grads, config.max_norm, xp=xp) if config.max_norm else None
        lr = learning_rate(
            state.step, base_lr=base_lr, schedule=config.schedule, total_steps=config.steps, warmup=config.warmup
        )
        optimizer.lr = optimizer.scheduled_lr = lr
        with sigint_deferred():  # the step and its count together: a Ctrl-C in the commit lands after both
            res = optimizer.step(grads, loss=loss, grad_norm=norm, step=state.step + 1)
            state.step += 1
            state.chunk += 1
            state.s = s_next if res.applied else None
            history.step.append(state.step)
            history.loss.append(res.loss)
            history.grad_norm.append(res.grad_norm)
            history.lr.append(lr)
            history.skipped += not res.applied
        ev, best = None, False
        if due(state.step):
            ev = run_eval(state.step)
            best = history.best() == (state.step, ev["loss"])
        if callback is not None:
            callback(
                TrainEvent(
                    step=state.step,
                    total=config.steps,
                    loss=res.loss,
                    grad_norm=res.grad_norm,
                    lr=lr,
                    tokens=int(xc.shape[0] * xc.shape[1]),
                    seconds=time.perf_counter() - t_start - eval_seconds[0],
                    applied=res.applied,
                    eval=ev,
                    best=best,
                )
            )
        if ev is not None and early_stop is not None and history.evals_since_best() >= early_stop:
            break
    return state, history
