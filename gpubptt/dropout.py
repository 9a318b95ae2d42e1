"""Dropout masks as a counter-based hash: each entry a function of (key, layer, time step, global example, unit).

    z = mix(mix(mix(mix(k + (l+1)·G) + t·G) + (offset + b)·G) + u·G)     splitmix64's finaliser, uint64
    M[l][t, b, u] = 1/(1−p) if z ≥ ⌈p·2⁶⁴⌉ else 0                         P(0) = p (to 2⁻⁶⁴)

The key k comes from a seed (the training loop's per-step ``dropout_seed``) or from one draw of
the model's generator. A sequential generator over a rank's shard would give each rank other
masks than one process gives the same streams; the hash gives every example of the global batch
its own masks whatever the rank count: a rank passes the index of its first stream as
``offset`` (0 in one process). Written once against ``xp``: the same bits on NumPy and CuPy, a
few elementwise passes per layer, no per-step work, no host sync.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np

from .errors import InputError

__all__ = ["check_offset", "draw_undone_on_failure", "dropout_masks", "mask_key"]

_MASK = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15  # splitmix64's increment: 2⁶⁴/φ, odd
_GOLDEN = np.uint64(_G)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: Any, tmp: Any, *, xp: Any) -> Any:
    """splitmix64's finaliser, in place on a uint64 array ``z`` (``tmp``: scratch of its shape); returns z."""
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        xp.right_shift(z, np.uint64(shift), out=tmp)
        xp.bitwise_xor(z, tmp, out=z)
        if mult is not None:
            xp.multiply(z, mult, out=z)  # wraps modulo 2⁶⁴, as intended
    return z


def _mixed(z: Any, *, xp: Any) -> Any:
    return _mix(z, xp.empty_like(z), xp=xp)


@contextlib.contextmanager
def draw_undone_on_failure(generator: Any) -> Iterator[None]:
    """A block that may draw from ``generator`` (None: nothing to keep): should the block raise, a NumPy generator
    is put back in the state it had before it, so a failed call draws no masks and the next call gets those the
    failed one would have had (a CuPy RandomState keeps its draw: its state is not read back from the device)."""
    state = generator.bit_generator.state if isinstance(generator, np.random.Generator) else None
    try:
        yield
    except BaseException:
        if state is not None:
            generator.bit_generator.state = state
        raise


def mask_key(key: Any, *, be: Any) -> Any:
    """The (1,) uint64 key of a draw on ``be``: from an int seed ≥ 0, or from one draw of a backend generator.

    An int seed folds to 64 bits (seeds below 2⁶⁴ are the key itself); a generator gives 2 uniform
    numbers whose top 32 bits each make the key (on the device: no host sync).
    """
    xp = be.xp
    if isinstance(key, (int, np.integer)):
        k = int(key)
        word, k = k & _MASK, k >> 64
        while k:  # wider seeds: fold the higher words in
            word = int(_mixed(np.array([word ^ (k & _MASK)], dtype=np.uint64), xp=np)[0])
            k >>= 64
        return be.asarray(np.array([word], dtype=np.uint64))
    u = xp.empty(2, dtype=xp.float64)
    be.fill_uniform(key, u)
    bits = (u * 2.0**32).astype(xp.uint64)  # two 32-bit halves
    return xp.left_shift(bits[:1], np.uint64(32)) | bits[1:]


def dropout_masks(masks: list[Any], key: Any, p: float, *, offset: int = 0, be: Any) -> None:
    """Fill each ``masks[l]`` (T, b, n) float array with inverted dropout: 0 with probability p, else 1/(1−p).

    ``key`` a (1,) uint64 array (``mask_key``); ``offset`` the global index of example 0 of these
    b examples. Entry [t, j, u] of layer l depends on (key, l, t, offset + j, u) only. The last
    hash runs over blocks of (t, j) rows of ``be.block_elements`` entries (in cache on the CPU),
    in two uint64 scratch blocks made once per call.
    """
    if not masks:
        return
    xp = be.xp
    T, b, n = masks[0].shape
    rows = max(1, min(T * b, be.block_elements // n))
    z, tmp = xp.empty((rows, n), dtype=xp.uint64), xp.empty((rows, n), dtype=xp.uint64)
    steps = xp.arange(T, dtype=xp.uint64) * _GOLDEN  # (T,)
    examples = (xp.arange(b, dtype=xp.uint64) + np.uint64(offset)) * _GOLDEN  # (b,)
    units = xp.arange(n, dtype=xp.uint64)[None, :] * _GOLDEN  # (1, n)
    keep_from = np.uint64(min(math.ceil(Fraction(p) * 2**64), _MASK))  # z ≥ this: kept, P = 1 − p
    scale = 1.0 / (1.0 - p)
    for l, M in enumerate(masks):
        k = _mixed(key + np.uint64((l + 1) * _G & _MASK), xp=xp)  # (1,) this layer's key
        a = _mixed(k + steps, xp=xp)  # (T,)
        e = _mixed(a[:, None] + examples[None, :], xp=xp).reshape(T * b, 1)  # one key per (t, j)
        out = M.reshape(T * b, n)  # a view: M is contiguous
        for i in range(0, T * b, rows):
            j = min(i + rows, T * b)
            zb, tb = z[: j - i], tmp[: j - i]
            xp.add(e[i:j], units, out=zb)
            _mix(zb, tb, xp=xp)  # (rows, n)
            xp.greater_equal(zb, keep_from, out=out[i:j])
            out[i:j] *= scale


def check_offset(offset: Any) -> int:
    """``offset`` as an int in [0, 2^63) (the global index of a batch's first example; the masks hash it as a
    uint64, so a larger one would wrap onto other examples' masks), else InputError."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not 0 <= offset < 2**63:
        raise InputError(
            f"dropout_offset must be an int in [0, 2^63) (the index of the first example in the global batch), "
            f"got {type(offset).__name__} {offset!r}"
        )
    return int(offset)
