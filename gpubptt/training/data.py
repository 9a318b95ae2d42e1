"""Training data, all made or read locally (nothing is downloaded).

- ``Vocab``: the characters of a text, saved with the model as Unicode code points.
- ``TextData``: character-level language modelling on any UTF-8 file, or on ``default_corpus()``,
  English-like text generated deterministically from a small grammar (subject–verb agreement,
  clauses, questions, punctuation), so training works with no data at hand. The first 90 % of the
  characters train, the last 10 % are held out.
- ``CopyTask``: long-range memory. k random symbols, ``delay`` blanks, a "go" marker, then the
  model must output the k symbols in order. ``k = 1`` is delayed recall of the first symbol.
  Its chance level is closed form: a model without memory can do no better than log A nats per
  recalled symbol (A equally likely symbols), every other target being a predictable blank.

Every data set hands out numbered, deterministic batches of whole sequences on the host:
``train_sequence(i, seed=..., batch_size=...)`` returns (x, y), both (L, B) int64, time-major.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError
from ..validation import check_positive_int

__all__ = ["TASKS", "CopyTask", "TextData", "Vocab", "default_corpus", "make_data", "read_text"]

TASKS = ("text", "copy", "recall")


# -- vocabulary ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Vocab:
    """The characters of a text in sorted order; id i is ``chars[i]``.

    >>> v = Vocab.from_text("abca")
    >>> v.encode("cab").tolist(), v.decode([0, 1])
    ([2, 0, 1], 'ab')
    """

    chars: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise InputError("a vocabulary needs at least one character")
        if len(set(self.chars)) != len(self.chars):
            raise InputError("a vocabulary must not repeat characters")
        surrogate = next((ch for ch in self.chars if 0xD800 <= ord(ch) <= 0xDFFF), None)
        if surrogate is not None:  # half of a UTF-16 pair: no UTF-8 text holds one, and none can be printed
            raise InputError(f"a vocabulary must hold characters, not the surrogate code point U+{ord(surrogate):04X}")
        object.__setattr__(self, "_index", {ch: i for i, ch in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        """Every distinct character of ``text``, sorted."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Token ids (N,) int64 of ``text``; InputError naming the first character not in the vocabulary."""
        if not isinstance(text, str):
            raise InputTypeError(f"the text to encode must be a str, got {type(text).__name__} {text!r}")
        try:
            return np.fromiter((self._index[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            raise InputError(
                f"character {exc.args[0]!r} is not in the model's vocabulary of {len(self)} characters"
            ) from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of token ids (N,): ints in [0, K), K = ``len(self)``; InputError naming the first that is not
        (a negative id would index from the end, a float be truncated, a bool read as 0 or 1)."""
        K, out = len(self), []
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < K:
                raise InputError(f"token id {i!r} is not an int in [0, {K}) (the vocabulary's {K} characters)")
            out.append(self.chars[int(i)])
        return "".join(out)

    def to_array(self) -> np.ndarray:
        """Code points (K,) int32: how a vocabulary is stored in a checkpoint."""
        return np.array([ord(ch) for ch in self.chars], dtype=np.int32)

    @classmethod
    def from_array(cls, a: np.ndarray) -> Vocab:
        """Inverse of ``to_array``; InputError on anything that is not a list of code points."""
        a = np.asarray(a)
        if a.ndim != 1 or a.dtype.kind not in "iu" or a.size == 0:
            raise InputError(f"a stored vocabulary must be a non-empty 1-d int array, got {a.dtype} {a.shape}")
        if a.min() < 0 or a.max() > 0x10FFFF:
            raise InputError("a stored vocabulary holds values that are not Unicode code points")
        return cls("".join(chr(int(c)) for c in a))


# -- text ---------------------------------------------------------------------------------------
def read_text(path: str | Path) -> str:
    """The contents of a UTF-8 text file; InputError if it is missing, unreadable, not UTF-8 or empty."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"text file {str(p)!r} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{str(p)!r} is a directory, expected a UTF-8 text file") from None
    except OSError as exc:
        raise InputError(f"cannot read text file {str(p)!r}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{str(p)!r} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    if not text:
        raise InputError(f"text file {str(p)!r} is empty")
    return text


_NOUNS = [  # (singular, plural)
    ("cat", "cats"),
    ("dog", "dogs"),
    ("bird", "birds"),
    ("child", "children"),
    ("fox", "foxes"),
    ("teacher", "teachers"),
    ("farmer", "farmers"),
    ("king", "kings"),
    ("girl", "girls"),
    ("wolf", "wolves"),
]
_PLACES = ["the river", "the old house", "the market", "the forest", "the hill", "the garden", "the sea"]
_ADJS = ["old", "small", "quiet", "happy", "brave", "hungry", "red", "little"]
_INTRANS = [("runs", "run"), ("sleeps", "sleep"), ("sings", "sing"), ("waits", "wait"), ("laughs", "laugh")]
_MOTION = [("goes", "go"), ("walks", "walk"), ("swims", "swim"), ("comes", "come"), ("returns", "return")]
_TRANS = [("sees", "see"), ("likes", "like"), ("follows", "follow"), ("finds", "find"), ("calls", "call")]
_ADVS = ["slowly", "today", "again", "at night", "in the morning", "once more"]
_CONJ = ["and", "but", "because", "while", "so"]


def _noun_phrase(rng: np.random.Generator, plural: bool) -> str:
    noun = _NOUNS[rng.integers(len(_NOUNS))][int(plural)]
    det = ["the", "some", "two", "many"][rng.integers(4)] if plural else ["the", "a", "one", "every"][rng.integers(4)]
    if det == "a" or rng.random() < 0.4:
        adj = _ADJS[rng.integers(len(_ADJS))]
        if det == "a" and adj[0] in "aeiou":
            det = "an"
        return f"{det} {adj} {noun}"
    return f"{det} {noun}"


def _clause(rng: np.random.Generator) -> str:
    plural = bool(rng.random() < 0.5)
    subject = _noun_phrase(rng, plural)
    r = rng.random()
    if r < 0.4:
        verb = _TRANS[rng.integers(len(_TRANS))][int(plural)]
        rest = f"{verb} {_noun_phrase(rng, bool(rng.random() < 0.5))}"
    elif r < 0.7:
        verb = _INTRANS[rng.integers(len(_INTRANS))][int(plural)]
        rest = f"{verb} {_ADVS[rng.integers(len(_ADVS))]}"
    else:
        verb = _MOTION[rng.integers(len(_MOTION))][int(plural)]
        rest = f"{verb} to {_PLACES[rng.integers(len(_PLACES))]}"
    return f"{subject} {rest}"


def _sentence(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.12:  # a question: "does the cat see ..." / "do the cats see ..."
        plural = bool(rng.random() < 0.5)
        verb = _TRANS[rng.integers(len(_TRANS))][1]
        aux = "do" if plural else "does"
        s = f"{aux} {_noun_phrase(rng, plural)} {verb} {_noun_phrase(rng, bool(rng.random() < 0.5))}?"
    elif r < 0.22:  # reported speech with quotes
        s = f'{_noun_phrase(rng, False)} says, "{_clause(rng)}."'
    elif r < 0.55:
        s = f"{_clause(rng)} {_CONJ[rng.integers(len(_CONJ))]} {_clause(rng)}."
    else:
        s = f"{_clause(rng)}."
    return s[0].upper() + s[1:]


def default_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """English-like text from a small grammar: deterministic for a given seed, about ``n_chars`` long.

    Sentences agree in number ("the cat sees", "two cats see"), join clauses with conjunctions, ask
    questions ("does ... ?") and quote speech, in paragraphs of a few sentences. Its vocabulary is
    about 40 characters; a model that learns only the letter frequencies scores ≈ 3.0 nats/char.
    """
    rng = np.random.default_rng(seed)
    paragraphs, size = [], 0
    while size < n_chars:
        para = " ".join(_sentence(rng) for _ in range(int(rng.integers(2, 6))))
        paragraphs.append(para)
        size += len(para) + 1
    return "\n".join(paragraphs)[:n_chars] + "\n"


class TextData:
    """Character-level language modelling: predict each next character.

    text: the whole text (the vocabulary covers all of it); the first ``1 − val_fraction`` trains,
    the rest is held out. ``source`` names it ("builtin" or a path) in checkpoints, beside the
    text's ``sha256`` digest and ``size_bytes`` (of its UTF-8 encoding), by which a resumed run
    notices a changed file. ``val_text`` (named ``val_source``, recorded with its own digest and size):
    a separate held-out text; then all of ``text`` trains, ``val_fraction`` is None, and the
    vocabulary covers both texts.
    """

    kind = "text"

    def __init__(
        self,
        text: str,
        *,
        vocab: Vocab | None = None,
        val_fraction: float | None = 0.1,
        source: str = "builtin",
        val_text: str | None = None,
        val_source: str | None = None,
    ):
        if not isinstance(text, str) or not isinstance(val_text, (str, type(None))):
            bad = text if not isinstance(text, str) else val_text
            raise InputTypeError(f"text and val_text must be str, got {type(bad).__name__}")
        number = isinstance(val_fraction, (int, float, np.integer, np.floating)) and not isinstance(val_fraction, bool)
        if val_text is None and not (number and 0 < val_fraction < 1):
            raise InputError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if val_text is not None and val_fraction is not None:
            raise InputError("give val_fraction (held out from the end of text) or val_text, not both")
        self.vocab = Vocab.from_text(text + (val_text or "")) if vocab is None else vocab
        ids = self.vocab.encode(text)
        if val_text is None:
            n_val = max(2, int(len(ids) * val_fraction))
            if len(ids) - n_val < 3:
                raise InputError(f"the text has only {len(ids)} characters; it needs at least {n_val + 3}")
            self.train_ids, self.val_ids = ids[:-n_val], ids[-n_val:]
        else:
            self.train_ids, self.val_ids = ids, self.vocab.encode(val_text)
            if len(self.train_ids) < 3 or len(self.val_ids) < 2:
                raise InputError(
                    f"the training text has {len(self.train_ids)} characters and the held-out text "
                    f"{len(self.val_ids)}; they need at least 3 and 2"
                )
        self.source = source
        self.val_fraction = None if val_fraction is None else float(val_fraction)  # as a checkpoint's JSON stores it
        raw = text.encode("utf-8")  # the file's own bytes: read_text decodes UTF-8 losslessly
        self.sha256, self.size_bytes = hashlib.sha256(raw).hexdigest(), len(raw)
        self.val_source = None
        if val_text is not None:
            raw = val_text.encode("utf-8")
            self.val_source = "held-out text" if val_source is None else val_source
            self.val_sha256, self.val_size_bytes = hashlib.sha256(raw).hexdigest(), len(raw)
        counts = np.bincount(self.train_ids, minlength=len(self.vocab)).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        self.unigram_loss = float(-(p * np.log(p)).sum()) + 0.0  # + 0.0: one character's −0.0 prints as 0

    def __repr__(self) -> str:
        val = "" if self.val_source is None else f", val_source={self.val_source!r}"
        return (
            f"TextData(source={self.source!r}{val}, chars={len(self.train_ids) + len(self.val_ids)}, "
            f"K={len(self.vocab)})"
        )

    @property
    def input_size(self) -> int:
        return len(self.vocab)

    @property
    def output_size(self) -> int:
        return len(self.vocab)

    @property
    def chance_loss(self) -> float:
        """log K nats/char: a model that guesses uniformly among the K characters."""
        return math.log(len(self.vocab))

    score_mask = None  # every step counts

    def spec(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this data set: the source, and the text's sha256 and size in bytes."""
        spec = {
            "kind": "text",
            "source": self.source,
            "val_fraction": self.val_fraction,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
        }
        if self.val_source is not None:  # a separate held-out text (val_fraction None)
            spec.update(val_source=self.val_source, val_sha256=self.val_sha256, val_size_bytes=self.val_size_bytes)
        return spec

    def check_batch(self, batch_size: int, chunk: int) -> None:
        """InputError when the training text is too short for B streams of at least one chunk."""
        need = batch_size * (chunk + 1) + chunk
        if len(self.train_ids) < need:
            raise InputError(
                f"the training text has {len(self.train_ids)} characters; batch {batch_size} × chunk {chunk} "
                f"needs at least {need}: use a longer text or a smaller batch or chunk"
            )

    @staticmethod
    def _streams(ids: np.ndarray, B: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        n = (len(ids) - 1 - offset) // B
        x = ids[offset : offset + B * n].reshape(B, n).T
        y = ids[offset + 1 : offset + 1 + B * n].reshape(B, n).T
        return x.copy(order="C"), y.copy(order="C")  # (n, B) each, the caller's (B = 1 is a view of ids already)

    def train_sequence(self, i: int, *, seed: int, batch_size: int, chunk: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Epoch i: the training text cut into B parallel streams, starting at a random offset < chunk.

        Returns x, y (L, B) int64 with y[t] = x[t+1] along each stream; L ≈ N / B.
        """
        batch_size, chunk = check_positive_int(batch_size, "batch_size"), check_positive_int(chunk, "chunk")
        return self._streams(self.train_ids, batch_size, self._offset(i, seed, chunk))

    @staticmethod
    def _offset(i: int, seed: int, chunk: int) -> int:
        """Where epoch i's streams start: a random offset below ``chunk``, from (seed, i)."""
        return int(np.random.default_rng(seed_words(seed, i)).integers(0, max(1, chunk)))

    def chunks_in_epoch(self, i: int, *, seed: int, batch_size: int, chunk: int | None) -> int:
        """The optimizer steps the training loop takes in epoch i: the whole chunks of its streams (at least
        one; ``chunk`` None: the whole sequence, one step)."""
        if not chunk:
            return 1
        n = (len(self.train_ids) - 1 - self._offset(i, seed, chunk)) // batch_size
        return max(1, n // chunk)

    def eval_sequences(self, *, batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """The held-out text as one batch of up to ``batch_size`` parallel streams."""
        batch_size = check_positive_int(batch_size, "batch_size")
        B = max(1, min(batch_size, (len(self.val_ids) - 1) // 64))
        return [self._streams(self.val_ids, B, 0)]


# -- long-range tasks ---------------------------------------------------------------------------
class CopyTask:
    """Recall k symbols after a delay: the copy/memory task (k = 1: delayed recall of the first symbol).

    Token ids: 0 blank, 1..A the symbols, A+1 the "go" marker. Input size D = A + 2, output K = A + 1.

        x:  a₁ … a_k  0 … 0 (delay)  go  0 … 0 (k−1)          L = 2k + delay steps
        y:  0 …………………… 0 (k + delay)   a₁ … a_k

    Each aᵢ is recalled k + delay steps after it was seen. A model without memory can at best
    predict the blanks and a uniform guess for each aᵢ: chance level log A nats per recalled symbol,
    k·log A / L averaged over all steps.
    """

    kind = "copy"

    def __init__(self, *, symbols: int = 8, length: int = 5, delay: int = 10) -> None:
        for name, v, lo in (("symbols", symbols, 2), ("length", length, 1), ("delay", delay, 0)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{name} must be an int ≥ {lo}, got {v!r}")
        self.A, self.k, self.delay = int(symbols), int(length), int(delay)
        self.kind = "recall" if self.k == 1 else "copy"

    def __repr__(self) -> str:
        return f"CopyTask(symbols={self.A}, length={self.k}, delay={self.delay})"

    @property
    def input_size(self) -> int:
        return self.A + 2

    @property
    def output_size(self) -> int:
        return self.A + 1

    @property
    def seq_len(self) -> int:
        """L = 2k + delay."""
        return 2 * self.k + self.delay

    @property
    def score_mask(self) -> np.ndarray:
        """(L,) bool: the k recall steps, where the chance level applies."""
        m = np.zeros(self.seq_len, dtype=bool)
        m[-self.k :] = True
        return m

    @property
    def chance_loss(self) -> float:
        """log A nats per recalled symbol (closed form: a memoryless model's best)."""
        return math.log(self.A)

    @property
    def chance_loss_all_steps(self) -> float:
        """k·log A / L: the same baseline averaged over every step."""
        return self.k * math.log(self.A) / self.seq_len

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": self.A, "length": self.k, "delay": self.delay}

    def dropped_steps(self, chunk: int | None) -> int:
        """The last steps of each sequence that chunks of ``chunk`` steps (None or 0: whole sequences) never train:
        training runs whole chunks only, and those steps hold the targets. 0 where the chunk divides the sequence
        or is no shorter than it."""
        return self.seq_len % chunk if chunk and chunk < self.seq_len else 0

    def check_batch(self, batch_size: int, chunk: int) -> None:
        """InputError for a ``chunk`` whose whole chunks leave the targets untrained (``dropped_steps``). Any batch
        works."""
        if self.dropped_steps(chunk):
            raise InputError(
                f"chunk {chunk} does not divide the {self.kind} task's sequence of {self.seq_len} steps: its last "
                f"{self.dropped_steps(chunk)}, where the targets are, would never train; give chunk=None (whole "
                "sequences) or a divisor of the length"
            )

    def sample(self, rng: np.random.Generator, B: int) -> tuple[np.ndarray, np.ndarray]:
        """B fresh sequences: x, y (L, B) int64."""
        k, L = self.k, self.seq_len
        a = rng.integers(1, self.A + 1, size=(k, B))
        x = np.zeros((L, B), dtype=np.int64)
        y = np.zeros((L, B), dtype=np.int64)
        x[:k] = a
        x[k + self.delay] = self.A + 1  # go
        y[L - k :] = a
        return x, y

    def train_sequence(self, i: int, *, seed: int, batch_size: int, chunk: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Batch i of B fresh sequences (L, B), the same for the same (seed, i)."""
        batch_size = check_positive_int(batch_size, "batch_size")
        return self.sample(np.random.default_rng(seed_words(seed, i)), batch_size)

    def eval_sequences(self, *, batch_size: int = 256) -> list[tuple[np.ndarray, np.ndarray]]:
        """A fixed held-out batch (its own seed, independent of the training seed)."""
        batch_size = check_positive_int(batch_size, "batch_size")
        return [self.sample(np.random.default_rng([2**31 - 1, self.A, self.k, self.delay]), batch_size)]


def seed_words(seed: int, i: int) -> list[int]:
    """The entropy of draw ``i`` of a run seeded ``seed`` (both ints ≥ 0): [seed, i] where both fit 32 bits (the
    streams every run had), else both in two 32-bit words each and a last word that is not 0. NumPy reads a larger
    int as several 32-bit words and pads short lists with zeros, so [seed + k·2³², i] was [seed, k, i] and met
    another seed's draws (seed 2³², batch 0 drew seed 0's batch 1)."""
    if seed < 2**32 and i < 2**32:
        return [seed, i]
    return [seed & 0xFFFFFFFF, seed >> 32, i & 0xFFFFFFFF, i >> 32, 0x9E3779B9]


def make_data(
    spec: dict[str, Any], *, text: str | None = None, vocab: Vocab | None = None, val_text: str | None = None
) -> TextData | CopyTask:
    """Rebuild a data set from its ``spec()`` (text data reads its text files unless given ``text``/``val_text``)."""
    kind = spec.get("kind")
    if kind == "text":
        if text is None:
            if spec.get("source", "builtin") != "builtin":
                text = read_text(spec["source"])
            else:
                text = default_corpus()
        if spec.get("val_source") is not None:
            val_text = read_text(spec["val_source"]) if val_text is None else val_text
            return TextData(text, vocab=vocab, val_fraction=None, source=spec.get("source", "builtin"),
                            val_text=val_text, val_source=spec["val_source"])  # fmt: skip
        return TextData(
            text, vocab=vocab, val_fraction=spec.get("val_fraction", 0.1), source=spec.get("source", "builtin")
        )
    if kind in ("copy", "recall"):
        missing = [k for k in ("symbols", "length", "delay") if k not in spec]
        if missing:
            raise InputError(f"a {kind} data spec needs symbols, length and delay; missing {', '.join(missing)}")
        return CopyTask(symbols=spec["symbols"], length=spec["length"], delay=spec["delay"])
    raise InputError(f"unknown data kind {kind!r}; expected one of {', '.join(TASKS)}")
