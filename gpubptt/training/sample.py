"""Generate text from a trained character model, one character at a time, on the host.

    s_t = φ(U x_t + W s_{t−1} + b)      p = softmax((V s_t + c) / τ)      x_{t+1} ~ p      (φ: the model's)

A stack of layers runs the same step layer by layer (layer l reads layer l − 1's new state). A
bidirectional model cannot generate: its reverse direction reads the characters still to come.

Sampling is inherently sequential and tiny (B = 1), so it runs on a NumPy copy of the model
whatever backend trained it. τ (temperature) < 1 sharpens the distribution, > 1 flattens it; τ = 0
(or ``greedy``) takes the most likely character every step (its limit: the argmax, the first of
equal maxima). ``top_k`` keeps the k most likely characters (with any equal to the k-th) and
``top_p`` the fewest most likely ones whose probabilities sum to at least p (nucleus sampling), in
that order, each renormalised; ``next_distribution`` is that distribution, for one step's logits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np

from ..errors import InputError, InputTypeError
from ..model import RNN
from .data import Vocab

__all__ = ["BIDIRECTIONAL_TEXT", "check_predicts_ahead", "next_distribution", "sample_chars", "sample_text"]

#: Why a bidirectional model neither generates nor trains on the text task (``run.resume_run`` says the same).
BIDIRECTIONAL_TEXT = (
    "a bidirectional model cannot generate text nor be trained to predict the next character: its reverse "
    "direction reads the characters still to come"
)


def check_predicts_ahead(model: RNN) -> None:
    """InputError (``BIDIRECTIONAL_TEXT``) for a bidirectional model: one that reads ahead cannot predict ahead."""
    if getattr(model, "bidirectional", False):
        raise InputError(BIDIRECTIONAL_TEXT)


def _is_number(v: object) -> bool:
    """A Python or NumPy int or float, not a bool (False and True would read as 0 and 1)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _check_modes(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a number ≥ 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise InputError(f"top_k must be an int ≥ 1 or None, got {top_k!r}")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise InputError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def next_distribution(
    z: np.ndarray, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> np.ndarray:
    """The distribution (K,) float64 that the next character is drawn from, given the logits z (K,).

    softmax(z / τ); then only the top_k largest (ties with the k-th kept); then only the fewest most
    likely whose sum reaches top_p (ties broken by index); each step renormalised. τ = 0: all mass
    on argmax z (the first of equal maxima).
    """
    _check_modes(temperature, top_k, top_p)
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 1 or not z.size:
        raise InputError(f"logits z must be one non-empty vector (K,), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise InputError(NONFINITE_LOGITS)
    if temperature == 0:
        p = np.zeros(z.shape)
        p[int(np.argmax(z))] = 1.0
        return p
    with np.errstate(over="ignore"):  # a tiny τ: (z − max z) / τ overflows to −inf on purpose
        q = np.exp((z - z.max()) / temperature)  # the maximum's entry is exp(0) = 1: the sum is ≥ 1
    if top_k is not None and top_k < len(q):
        q[q < np.sort(q)[-top_k]] = 0.0
    if top_p is not None and top_p < 1:
        order = np.argsort(-q, kind="stable")
        cum = np.cumsum(q[order]) / q.sum()
        # the first prefix with mass ≥ top_p: a sum that rounding leaves a hair below it counts as reaching it
        keep = min(len(q), int(np.searchsorted(cum, top_p - 1e-12)) + 1)
        q[order[keep:]] = 0.0
    return q / q.sum()


def sample_chars(
    model: RNN,
    vocab: Vocab,
    *,
    length: int = 500,
    temperature: float = 1.0,
    seed: int | None = 0,
    prime: str = "",
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> Iterator[str]:
    """The characters of ``sample_text``, one at a time as each is drawn: ``prime`` first, then ``length`` more.

    Every argument is checked here, before the first character (InputError), so a caller that
    streams the text never prints half of it and then fails on a bad argument. ``greedy`` (or
    ``temperature=0``) takes the argmax every step (then ``top_k``, ``top_p`` and, with greedy, a temperature
    other than 0 or 1 (the default) are refused: they would not apply); ``top_k``/``top_p`` as
    ``next_distribution``.
    """
    check_predicts_ahead(model)
    if model.input_size != len(vocab) or model.output_size != len(vocab):
        raise InputError(
            f"the model has D={model.input_size}, K={model.output_size}; the vocabulary has {len(vocab)} characters"
        )
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise InputError(f"length must be an int ≥ 0, got {length!r}")
    length = int(length)
    _check_modes(temperature, top_k, top_p)
    if not isinstance(greedy, (bool, np.bool_)):
        raise InputError(f"greedy must be a bool, got {greedy!r}")
    if not isinstance(prime, str):
        raise InputTypeError(f"prime must be a str (the text to start from), got {type(prime).__name__} {prime!r}")
    if greedy or temperature == 0:  # the argmax every step: a temperature or a cut would be ignored: refused
        cuts = {"temperature": temperature if greedy and temperature not in (0, 1) else None, "top_k": top_k,
                "top_p": top_p}  # fmt: skip
        if given := [f"{k}={v!r}" for k, v in cuts.items() if v is not None]:
            mode = "greedy" if greedy else "temperature=0"
            raise InputError(f"{mode} takes the most likely character every step; {', '.join(given)} would not apply")
    cut_k, cut_p = None if top_k is None else int(top_k), None if top_p is None else float(top_p)
    mode = (0.0 if greedy else float(temperature), cut_k, cut_p)  # (τ, k, p) of every draw
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"seed must be an int ≥ 0 or None, got {seed!r}")
    primed = list(vocab.encode(prime)) if prime else []  # InputError naming a character outside the vocabulary
    host = model.to("numpy") if model.backend.name != "numpy" else model
    if getattr(model, "cell_name", "rnn") != "rnn":  # a gated cell: one step of the model's own forward
        rng = np.random.default_rng(seed)
        return _draw_steps(host, vocab, primed, prime, length, mode, rng)
    p = {k: v.astype(np.float64) for k, v in host.params.items()}
    layers = [{k: p[r.name(k)] for k in ("U", "W", "b") if r.name(k) in p} for r in host.recurrences]
    step = functools.partial(model.cell.activate, xp=np)
    return _draw(layers, p, step, vocab, primed, prime, length, mode, np.random.default_rng(seed))


def _draw(
    layers: list[dict[str, np.ndarray]],
    p: dict[str, np.ndarray],
    phi: Callable[[np.ndarray], np.ndarray],
    vocab: Vocab,
    ids: list[int],
    prime: str,
    length: int,
    mode: tuple[float, int | None, float | None],
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
        x = _draw_one(V @ s + c, mode, rng)
        yield vocab.decode([x])


#: the refusal of logits with NaN or infinity (weights that diverged): nothing to draw from
NONFINITE_LOGITS = "the logits are not finite (NaN or infinity: the model's weights diverged?)"


def _draw_one(z: np.ndarray, mode: tuple[float, int | None, float | None], rng: np.random.Generator) -> int:
    """One id drawn from ``next_distribution(z, ...)`` for mode (τ, top_k, top_p), z (K,) finite logits.

    The maximum is subtracted *before* dividing by τ: (z − max z) / τ ≤ 0, so nothing overflows, and
    as τ → 0 every logit below the maximum goes to −∞ (probability 0): the limit is the argmax (ties
    shared evenly). Dividing first turned τ = 1e-308 into inf − inf = NaN. τ = 0 is the argmax
    itself and draws nothing from ``rng``.
    """
    tau, top_k, top_p = mode
    if tau == 0:  # next_distribution checks the logits otherwise
        if not np.isfinite(z).all():
            raise InputError(NONFINITE_LOGITS)
        return int(np.argmax(z))
    return int(rng.choice(len(z), p=next_distribution(z, temperature=tau, top_k=top_k, top_p=top_p)))


def _draw_steps(
    model: RNN,
    vocab: Vocab,
    ids: list[int],
    prime: str,
    length: int,
    mode: tuple[float, int | None, float | None],
    rng: np.random.Generator,
) -> Iterator[str]:
    """As ``_draw`` for any cell and stack: each step is ``model.forward`` on one token (T = B = 1), its
    final state (an LSTM's (h, c)) carried into the next; p = softmax(z / τ) of the step's logits z."""
    if not ids:
        ids = list(vocab.encode("\n")) if "\n" in vocab.chars else [int(rng.integers(len(vocab)))]
    state = None
    for i in ids[:-1]:  # read the prime
        state = model.forward(np.array([[i]]), state, head="softmax").final_state  # whatever model.head says
    if prime:
        yield prime
    x = ids[-1]
    for _ in range(length):
        out = model.forward(np.array([[x]]), state, head="softmax")
        state = out.final_state
        # the logits themselves: a float32 softmax's log is floored past a gap of ~87, losing what τ > 1 restores
        x = _draw_one(model.backend.to_numpy(out.logits[0, 0]).astype(np.float64), mode, rng)
        yield vocab.decode([x])


def sample_text(
    model: RNN,
    vocab: Vocab,
    *,
    length: int = 500,
    temperature: float = 1.0,
    seed: int | None = 0,
    prime: str = "",
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
) -> str:
    """``prime`` followed by ``length`` sampled characters (deterministic for a given seed).

    The model must map the vocabulary to itself (D = K = len(vocab)). An empty prime starts from
    the zero state after a line break (or a random character when the text has none); the returned
    text then holds only the ``length`` sampled characters. ``sample_chars`` yields the same text
    one character at a time.
    """
    chars = sample_chars(
        model, vocab, length=length, temperature=temperature, seed=seed, prime=prime, top_k=top_k, top_p=top_p,
        greedy=greedy,
    )  # fmt: skip
    return "".join(chars)
