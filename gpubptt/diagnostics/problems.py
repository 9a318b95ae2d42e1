"""What ``gpubptt vanish`` measures: a random model on random tokens, or a trained model from a checkpoint
on windows of a text or on its own task. Kept apart from the analyses, so analysing a model imports no
checkpoint, data or training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import get_backend
from ..engine.memory import check_fits, vanish_memory
from ..errors import InputError
from ..model import RNN
from ..training.data import Vocab, make_data, read_text
from ..training.record import CheckpointError, load_checkpoint
from ._common import (
    check_int,
)

# -- what `gpubptt vanish` measures: a random model, or a trained one on its own data ----------------
DEFAULT_SEQ_LEN = 30  # T of the windows cut from a text when none is asked for


@dataclass
class VanishProblem:
    """A model and one batch to diagnose, and what they are.

    model     the RNN, on the chosen backend and in the chosen dtype
    x, y      (T, B) int token ids and their targets, on the model's backend
    about     a JSON-ready description: {"model": "random", ...} or {"checkpoint": path, "task", "data", ...}
    """

    model: RNN
    x: Any
    y: Any
    about: dict[str, Any]

    @property
    def T(self) -> int:
        return int(self.x.shape[0])

    @property
    def B(self) -> int:
        return int(self.x.shape[1])


def random_problem(
    T: int,
    H: int,
    B: int,
    vocab: int,
    *,
    backend: Any = "auto",
    dtype: Any = "float64",
    init: str = "wildml",
    seed: int = 0,
    num_layers: int = 1,
    bidirectional: bool = False,
    nonlinearity: str = "tanh",
) -> VanishProblem:
    """A random model (D = K = ``vocab``; ``num_layers``, ``bidirectional``, ``nonlinearity`` as in
    ``RNN``) and random tokens and targets x, y (T, B), all from ``seed``.

    InsufficientMemoryError (an InputError) before anything is allocated when the diagnostics of
    these sizes cannot fit in the backend's available memory (see ``gpubptt.engine.memory``).
    """
    T, H, B, vocab = (check_int(v, name, 1) for v, name in ((T, "T"), (H, "H"), (B, "B"), (vocab, "vocab")))
    backend = get_backend(backend)
    recurrences = num_layers * (2 if bidirectional else 1) if isinstance(num_layers, int) else 1
    _check_memory(vocab, H, vocab, T, B, dtype, backend, random=True, recurrences=recurrences)
    model = RNN(
        vocab, H, vocab, backend=backend, dtype=dtype, init=init, seed=seed, num_layers=num_layers, bias=False,
        bidirectional=bidirectional, nonlinearity=nonlinearity,
    )  # fmt: skip
    be = model.backend
    rng = np.random.default_rng(seed)
    x = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) token ids
    y = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) targets
    about = {"model": "random", "vocab": vocab, "init": init}
    if num_layers > 1 or bidirectional or nonlinearity != "tanh":
        about.update(layers=num_layers, bidirectional=bidirectional, nonlinearity=nonlinearity)
    return VanishProblem(model, x, y, about)


def _check_memory(
    D: Any, H: Any, K: Any, T: Any, B: Any, dtype: Any, be: Any, *, random: bool, recurrences: int = 1
) -> None:
    """InsufficientMemoryError when ``vanish_sweep`` on these sizes cannot fit; bad sizes are left to their checks."""
    sizes = (D, H, K, T, B)
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in sizes):
        return
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return
    estimate = vanish_memory(
        D, H, K, T=T, B=B, itemsize=itemsize, random=random, chunk_elements=be.chunk_elements, recurrences=recurrences
    )
    check_fits(estimate, be.available_memory(), f"diagnosing T={T}, B={B}, H={H}, D={D}, K={K} ({np.dtype(dtype)})")


def text_windows(
    ids: np.ndarray, T: int, B: int, *, seed: int = 0, what: str = "the text"
) -> tuple[np.ndarray, np.ndarray]:
    """B windows of T tokens at random starts (from ``seed``) as x, the tokens one later as y: (T, B) each.

    ids (N,) token ids of a text; needs N ≥ T + 1. Column b is ids[a_b : a_b + T] and its targets
    ids[a_b + 1 : a_b + T + 1], with a_b uniform in [0, N − T − 1] (windows may overlap).
    """
    T, B, seed = check_int(T, "T", 1), check_int(B, "B", 1), check_int(seed, "seed", 0)
    N = len(ids)
    if N < T + 1:
        raise InputError(
            f"{what} has {N} characters; a window of T={T} and its next character need at least {T + 1}: "
            "choose a smaller T or a longer text"
        )
    starts = np.random.default_rng(seed).integers(0, N - T, size=B)  # (B,)
    at = starts[None, :] + np.arange(T)[:, None]  # (T, B)
    return ids[at], ids[at + 1]


def _encode_file(path: Any, vocab: Vocab) -> np.ndarray:
    """Token ids (N,) of a UTF-8 file in ``vocab``; InputError naming the first character not in it."""
    text = read_text(path)
    try:
        return vocab.encode(text)
    except InputError:
        known = set(vocab.chars)
        i, ch = next((i, ch) for i, ch in enumerate(text) if ch not in known)
        raise InputError(
            f"{str(path)!r}: character {ch!r} (offset {i}) is not in the model's vocabulary of "
            f"{len(vocab)} characters {vocab.chars!r}"
        ) from None


def checkpoint_problem(
    path: Any,
    *,
    T: int | None = None,
    B: int = 8,
    seed: int = 0,
    backend: Any = "auto",
    dtype: Any = None,
    text: Any = None,
) -> VanishProblem:
    """The model of a checkpoint (from ``gpubptt train``) and a batch of its own kind of data.

    Text models: B windows of T characters (default ``DEFAULT_SEQ_LEN``) from the UTF-8 file
    ``text``, encoded with the checkpoint's vocabulary, or else from the held-out part of the text
    the checkpoint was trained on (rebuilt by ``gpubptt.training.data.make_data`` from its data spec); the
    targets are the next characters. Copy/recall models: B fresh sequences of the task, whose
    length L = 2k + delay is T (a given T must equal it). Returns x, y (T, B), drawn from ``seed``.
    ``dtype=None`` keeps the checkpoint's dtype; float64 widens float32 weights exactly.

    Raises CheckpointError (an InputError) for a missing or bad file, InputError for data that does
    not fit the model (the first character outside the vocabulary is named), InsufficientMemoryError
    for T and B whose diagnostics cannot fit in memory, all before any work.
    """
    if T is not None:
        T = check_int(T, "T", 1)
    B, seed = check_int(B, "B", 1), check_int(seed, "seed", 0)
    where = f"checkpoint {str(path)!r}"
    ck = load_checkpoint(path, backend=backend)
    spec = ck.data or {}
    kind = spec.get("kind", "text" if ck.vocab is not None else None)
    m = ck.model
    if kind in ("copy", "recall") and T is None:
        with_T = make_data(spec).seq_len
    else:
        with_T = DEFAULT_SEQ_LEN if T is None else T
    _check_memory(
        m.input_size, m.hidden_size, m.output_size, with_T, B, dtype or m.dtype, m.backend, random=False,
        recurrences=m.num_states,
    )  # fmt: skip
    model = m
    if dtype is not None:
        model = RNN.from_params(m.params, backend=m.backend, dtype=dtype, cell=m.cell)  # the cell, with its options
    if kind in ("copy", "recall"):
        if text is not None:
            raise InputError(
                f"{where} was trained on the {kind} task, which makes its own sequences; "
                "a text file applies to text models only"
            )
        task = make_data(spec)
        if (task.input_size, task.output_size) != (model.input_size, model.output_size):
            raise CheckpointError(
                f"{where}: the {kind} task has D={task.input_size}, K={task.output_size} but the model has "
                f"D={model.input_size}, K={model.output_size}"
            )
        if T is not None and T != task.seq_len:
            raise InputError(
                f"{where}: the {kind} task's sequences have T = 2·{task.k} + delay {task.delay} = {task.seq_len} "
                f"steps; T={T} does not apply"
            )
        x, y = task.sample(np.random.default_rng(seed), B)  # (L, B) each
        data = f"{task.A} symbols, length {task.k}, delay {task.delay}"
    elif kind == "text":
        if ck.vocab is None:
            raise CheckpointError(f"{where} describes text data but holds no vocabulary to encode it with")
        T = DEFAULT_SEQ_LEN if T is None else T
        if text is not None:
            ids, data = _encode_file(text, ck.vocab), str(text)
        elif ck.data is None:
            raise InputError(f"{where} holds a vocabulary but no description of its training text; give a text file")
        else:
            source = spec.get("source", "builtin")
            try:
                ids = make_data(spec, vocab=ck.vocab).val_ids  # the held-out last part
            except InputError as exc:
                raise InputError(f"{where}: its training text cannot be rebuilt ({exc}); give a text file") from None
            data = f"held-out text of {'the built-in corpus' if source == 'builtin' else repr(source)}"
        x, y = text_windows(ids, T, B, seed=seed, what=data)
    else:
        raise InputError(
            f"{where} holds no vocabulary and no copy/recall task (data kind {kind!r}): no data fits its model"
        )
    about = {
        "checkpoint": str(path),
        "step": ck.state.step,
        "task": kind,
        "data": data,
        "D": model.input_size,
        "K": model.output_size,
        "init": ck.meta["model"].get("init", "custom"),
    }
    be = model.backend
    return VanishProblem(model, be.asarray(x), be.asarray(y), about)
