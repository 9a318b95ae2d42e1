"""How big a training run is: its step count (``--steps`` or ``--epochs``, counted as the loop trains), how its
schedule spans a resumed run's new total, and whether its memory fits (refused up front, or recomputed in
segments under ``--max-memory``).

    >>> from gpubptt.training.run import new_run
    >>> run = new_run({"task": "recall", "delay": 3, "hidden": 8}, backend="numpy", steps=10)
    >>> run.config.steps
    10
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..backend import Backend
from ..cells import make_cell
from ..engine.memory import InsufficientMemoryError, check_fits, format_bytes, train_memory
from ..engine.recompute import call_memory, check_max_memory, choose
from ..errors import InputError
from ..validation import effective_truncate
from .data import CopyTask, TextData
from .loop import TrainConfig, learning_rate

__all__ = ["EXACT_EPOCHS", "INT_MAX", "check_memory", "recompute_plan", "schedule_note", "total_steps"]

INT_MAX = 2**63 - 1  # steps, seeds and positions are stored as int64 in a checkpoint


def schedule_note(config: TrainConfig, saved_steps: int, step: int) -> str | None:
    """A note, or None: a run saved at ``step`` of ``saved_steps`` continues to ``config.steps``, and its
    ``config.schedule`` (cosine, step; warm-up alone does not depend on the total) is spread over the new
    total, so the rate moves at once from what the saved run would have used next."""
    if config.schedule == "constant" or config.steps == saved_steps or step >= config.steps or config.lr is None:
        return None
    kw = {"base_lr": config.lr, "schedule": config.schedule, "warmup": config.warmup}
    before = learning_rate(step, total_steps=saved_steps, **kw)
    after = learning_rate(step, total_steps=config.steps, **kw)
    if before == after:
        return None
    return (
        f"the {config.schedule} schedule now spans {config.steps} steps instead of {saved_steps}: the learning rate "
        f"at step {step + 1} is {after:.3g} where the saved run would have used {before:.3g}"
    )


#: above this many --epochs the step count is estimated from the first epoch's (each epoch is counted below it)
EXACT_EPOCHS = 10_000


def total_steps(data: Any, config: TrainConfig, *, steps: int | None, epochs: float | None, default: int) -> int:
    """The step count to train to: ``steps``, or ``epochs`` passes over the training text, or ``default``."""
    if epochs is not None and steps is not None:
        raise InputError("give steps or epochs, not both")
    if epochs is None:
        return default if steps is None else steps
    if data.kind != "text" or not epochs > 0:
        raise InputError("epochs needs text data and a positive number")
    chunk, B, seed = config.chunk, config.batch_size, config.seed
    count = lambda i: data.chunks_in_epoch(i, seed=seed, batch_size=B, chunk=chunk)  # noqa: E731
    per_epoch = count(0)
    if not epochs * per_epoch <= INT_MAX:  # also NaN
        raise InputError(
            f"--epochs {epochs} is {epochs * per_epoch:.3g} steps of about {per_epoch} per epoch, more than {INT_MAX}"
        )
    whole = int(epochs)
    if whole > EXACT_EPOCHS:  # so many passes that one chunk more or less per epoch no longer matters: scale
        return max(1, round(sum(count(i) for i in range(EXACT_EPOCHS)) * epochs / EXACT_EPOCHS))
    # epoch by epoch, as the loop runs them: each starts at its own random offset, which can leave one chunk fewer
    total = sum(count(i) for i in range(whole)) + round((epochs - whole) * count(whole))
    return max(1, total)


def check_memory(
    st: Mapping[str, Any], data: TextData | CopyTask, config: TrainConfig, be: Backend, max_memory: int | None = None
) -> None:
    """InsufficientMemoryError, with the numbers, when the run's estimated peak memory exceeds what ``be`` has.
    ``max_memory`` (``--max-memory``, bytes): the training calls' budget, which caps their workspaces' part (a plan
    that stores more recomputes, or is refused by ``recompute_plan``)."""
    max_memory = check_max_memory(max_memory)
    H, dtype = st["hidden"], np.dtype(st["dtype"]).name  # both checked by _check_settings
    B = config.batch_size
    if data.kind == "text":
        L = max(1, len(data.train_ids) // B)  # the length of each of the B streams
        eval_B = max(1, min(16, (len(data.val_ids) - 1) // 64))  # as TextData.eval_sequences and evaluate
        eval_T = min(256, max(1, (len(data.val_ids) - 1) // eval_B))
    else:
        L = data.seq_len
        eval_B, eval_T = 256, min(256, data.seq_len)
    T = min(config.chunk or L, L)  # a chunk longer than the sequence trains on the whole sequence
    truncate = effective_truncate(config.truncate, T)
    slots = {"adam": 2, "adagrad": 1}.get(st["optimizer"], 1 if st["momentum"] else 0)
    estimate = train_memory(
        data.input_size, H, data.output_size, T=T, B=B, itemsize=np.dtype(dtype).itemsize, slots=slots,
        bias=bool(st["bias"]), truncate=truncate, eval_T=eval_T, eval_B=eval_B,
        chunk_elements=be.chunk_elements, num_layers=st["layers"], dropout=st["dropout"] > 0,
        cell=make_cell(st["cell"]),  # its parameter shapes and declared buffers
    )  # fmt: skip
    if max_memory is not None:  # the training step recomputes within the budget (or recompute_plan refuses it)
        part = "forward+BPTT workspaces"
        estimate.parts[part] = min(estimate.parts[part], max_memory)
    if data.kind != "text":  # the task's int64 (L, B) inputs and targets, of a training and a held-out batch
        estimate.parts["task sequences"] = 2 * 8 * L * (B + eval_B)
    else:  # the corpus's int64 ids, and each epoch's (L, B) inputs and targets of the whole stream
        estimate.parts["text ids and streams"] = 8 * (len(data.train_ids) + len(data.val_ids)) + 2 * 8 * L * B
    layers = f" --layers {st['layers']}" if st["layers"] > 1 else ""
    what = f"training --hidden {H}{layers} on batches of --batch {B} × {T} steps ({st['optimizer']}, {dtype})"
    try:
        check_fits(estimate, be.available_memory(), what)
    except InsufficientMemoryError as exc:
        task = {"text": "", "recall": ", fewer --symbols or a shorter --delay"}.get(
            data.kind, ", fewer --symbols, a shorter --copy-length or a shorter --delay"
        )
        smaller = f"--hidden, --batch or --chunk{task}"
        raise InsufficientMemoryError(f"{exc}: choose a smaller {smaller}") from None


def recompute_plan(run: Any, max_memory: int, *, batch_size: int | None = None, as_given: str | None = None) -> str:
    """How each training step of ``run`` (a ``run.Run``) fits in ``max_memory`` bytes: a sentence for the log.

    ``batch_size``: the streams one process runs (a rank's share under ``--distributed``; default all).
    ``as_given``: the budget as the user wrote it ('512M'), echoed beside its size in the units the
    sentence uses ('--max-memory 512M = 536.9 MB': K, M, G are powers of 1024, the sentence's MB 10^6).

    Whole sequences (``--chunk 0``) whose stored plan exceeds the budget recompute their states in
    segments (``gpubptt.engine.recompute``). InsufficientMemoryError, naming the smallest budget that
    works, when no policy fits; InputError when the run cannot recompute (truncation, dropout).
    """
    x, _ = run.data.train_sequence(
        0, seed=run.config.seed, batch_size=run.config.batch_size, chunk=run.config.chunk or 1
    )
    B = run.config.batch_size if batch_size is None else batch_size
    T = min(run.config.chunk or x.shape[0], x.shape[0])
    m = run.model
    c = choose(
        m, T, B, tokens=True, lengths=False, recompute="auto", max_memory=max_memory, truncate=run.config.truncate
    )
    stored = call_memory(m, T, B, truncate=run.config.truncate).total
    budget = format_bytes(max_memory)
    if as_given is not None and as_given.strip() != str(max_memory):
        budget = f"{as_given.strip()} = {budget}"
    if c is None:
        return f"{T}-step batches keep every state: {format_bytes(stored)} ≤ --max-memory {budget}"
    need = call_memory(m, T, B, recompute=c).total
    return (
        f"{T}-step batches recompute states in segments of {c} steps: {format_bytes(need)} instead of "
        f"{format_bytes(stored)} stored (--max-memory {budget})"
    )
