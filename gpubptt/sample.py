"""Generate text from a trained character model, one character at a time, on the host.

    s_t = φ(U x_t + W s_{t−1} + b)      p = softmax((V s_t + c) / τ)      x_{t+1} ~ p      (φ: the model's)

A stack of layers runs the same step layer by layer (layer l reads layer l − 1's new state). A
bidirectional model cannot generate: its reverse direction reads the characters still to come.

Sampling is inherently sequential and tiny (B = 1), so it runs on a NumPy copy of the model
whatever backend trained it. τ (temperature) < 1 sharpens the distribution, > 1 flattens it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np

from .data import Vocab
from .errors import InputError
from .model import RNN

__all__ = ["BIDIRECTIONAL_TEXT", "check_predicts_ahead", "sample_chars", "sample_text"]

#: Why a bidirectional model neither generates nor trains on the text task (``run.resume_run`` says the same).
BIDIRECTIONAL_TEXT = (
    "a bidirectional model cannot generate text nor be trained to predict the next character: its reverse "
    "direction reads the characters still to come"
)


def check_predicts_ahead(model: RNN) -> None:
    """InputError (``BIDIRECTIONAL_TEXT``) for a bidirectional model: one that reads ahead cannot predict ahead."""
    if getattr(model, "bidirectional", False):
        raise InputError(BIDIRECTIONAL_TEXT)


def sample_chars(
    model: RNN, vocab: Vocab, *, length: int = 500, temperature: float = 1.0, seed: int | None = 0, prime: str = ""
) -> Iterator[str]:
    """The characters of ``sample_text``, one at a time as each is drawn: ``prime`` first, then ``length`` more.

    Every argument is checked here, before the first character (InputError), so a caller that
    streams the text never prints half of it and then fails on a bad argument.
    """
    check_predicts_ahead(model)
    if model.input_size != len(vocab) or model.output_size != len(vocab):
        raise InputError(
            f"the model has D={model.input_size}, K={model.output_size}; the vocabulary has {len(vocab)} characters"
        )
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise InputError(f"length must be an int ≥ 0, got {length!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive number, got {temperature!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed must be an int ≥ 0 or None, got {seed!r}")
    primed = list(vocab.encode(prime)) if prime else []  # InputError naming a character outside the vocabulary
    host = model.to("numpy") if model.backend.name != "numpy" else model
    if getattr(model, "cell_name", "rnn") != "rnn":  # a gated cell: one step of the model's own forward
        rng = np.random.default_rng(seed)
        return _draw_steps(host, vocab, primed, prime, length, temperature, rng)
    p = {k: v.astype(np.float64) for k, v in host.params.items()}
    layers = [{k: p[r.name(k)] for k in ("U", "W", "b") if r.name(k) in p} for r in host.recurrences]
    step = functools.partial(model.cell.activate, xp=np)
    return _draw(layers, p, step, vocab, primed, prime, length, temperature, np.random.default_rng(seed))


def _draw(
    layers: list[dict[str, np.ndarray]],
    p: dict[str, np.ndarray],
    phi: Callable[[np.ndarray], np.ndarray],
    vocab: Vocab,
    ids: list[int],
    prime: str,
    length: int,
    tau: float,
    rng: np.random.Generator,
) -> Iterator[str]:
    V, c = p["V"], p.get("c", 0.0)
    if not ids:  # condition on a line break when the text has them (a fresh paragraph), else on a random character
        ids = list(vocab.encode("\n")) if "\n" in vocab.chars else [int(rng.integers(len(vocab)))]
    states = [np.zeros(q["W"].shape[0]) for q in layers]

    def step(x: int) -> np.ndarray:  # s_t = φ(U x_t + W s_{t-1} + b), layer by layer
        inp = None
        for i, q in enumerate(layers):
            ux = q["U"][:, x] if inp is None else q["U"] @ inp
            states[i] = inp = phi(ux + q["W"] @ states[i] + q.get("b", 0.0))
        return inp

    for i in ids[:-1]:  # read the prime
        step(i)
    if prime:
        yield prime
    x = ids[-1]
    for _ in range(length):
        s = step(x)
        x = _draw_one(V @ s + c, tau, rng)
        yield vocab.decode([x])


def _draw_one(z: np.ndarray, tau: float, rng: np.random.Generator) -> int:
    """One id drawn from softmax(z / τ), z (K,) finite logits, for any finite τ > 0.

    The maximum is subtracted *before* dividing by τ: (z − max z) / τ ≤ 0, so nothing overflows, and
    as τ → 0 every logit below the maximum goes to −∞ (probability 0): the limit is the argmax (ties
    shared evenly). Dividing first turned τ = 1e-308 into inf − inf = NaN.
    """
    with np.errstate(over="ignore"):  # a tiny τ: (z − max z) / τ overflows to −inf on purpose
        q = np.exp((z - z.max()) / tau)  # the maximum's entry is exp(0) = 1: the sum is ≥ 1
    return int(rng.choice(len(q), p=q / q.sum()))


def _draw_steps(
    model: RNN, vocab: Vocab, ids: list[int], prime: str, length: int, tau: float, rng: np.random.Generator
) -> Iterator[str]:
    """As ``_draw`` for any cell and stack: each step is ``model.forward`` on one token (T = B = 1), its
    final state (an LSTM's (h, c)) carried into the next; p = softmax(log ŷ / τ)."""
    if not ids:
        ids = list(vocab.encode("\n")) if "\n" in vocab.chars else [int(rng.integers(len(vocab)))]
    state = None
    for i in ids[:-1]:  # read the prime
        state = model.forward(np.array([[i]]), state).final_state
    if prime:
        yield prime
    x = ids[-1]
    for _ in range(length):
        out = model.forward(np.array([[x]]), state)
        state = out.final_state
        x = _draw_one(np.log(np.maximum(out.probs[0, 0].astype(np.float64), 1e-300)), tau, rng)
        yield vocab.decode([x])


def sample_text(
    model: RNN, vocab: Vocab, *, length: int = 500, temperature: float = 1.0, seed: int | None = 0, prime: str = ""
) -> str:
    """``prime`` followed by ``length`` sampled characters (deterministic for a given seed).

    The model must map the vocabulary to itself (D = K = len(vocab)). An empty prime starts from
    the zero state after a line break (or a random character when the text has none); the returned
    text then holds only the ``length`` sampled characters. ``sample_chars`` yields the same text
    one character at a time.
    """
    return "".join(sample_chars(model, vocab, length=length, temperature=temperature, seed=seed, prime=prime))
