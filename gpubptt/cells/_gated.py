"""What the gated cells share: their identity (a parameter-free cell is equal to any of its kind) and the
layout of W for the per-step forward GEMM."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import InputError
from ._loops import split_rows, splits
from .base import Cell


def forward_weight(W: Any, Wt: Any, T: int, B: int, be: Backend, *, loop: bool = False) -> Any:
    """Wᵀ (H, G·H) for the step GEMM h_{t-1} @ Wᵀ: packed by the backend for B rows where it packs (MKL's
    packed B, made once per forward, reused by all T steps; ``loop``: for any size, where the cell's compiled
    step loops run, ``Backend.pack``), else the transposed view of W (G·H, H) or its row-major copy in Wt.

    A BLAS runs the step GEMM faster on a row-major Wᵀ from two rows up (NumPy's OpenBLAS on one thread, as
    the step GEMMs run, G = 4, µs per step, view against copy: B = 4, H = 128 37 against 6; B = 32, H = 256 238
    against 158; B = 32, H = 512 1020 against 718; B = 1 equal), but the copy costs 0.08, 0.3, 4.4 and 19 ms at
    H = 128, 256, 512 and 1024 (beyond the caches from H = 512): it pays over a forward of 4 steps or more up
    to H = 256, of about 16–20 at H = 512 and 1024 (``COPY_MIN_STEPS``, ``COPY_MIN_STEPS_LARGE``).
    """
    view = W.T
    packed = be.pack(view, B, T, loop=loop)
    if packed is not view:
        return packed
    H = W.shape[1]
    if B >= 2 and T >= (COPY_MIN_STEPS if H <= 256 else COPY_MIN_STEPS_LARGE):
        Wt[...] = view  # once per forward
        return Wt
    return view


#: the fewest steps over which a row-major copy of Wᵀ pays (``forward_weight``) up to H = 256, and beyond
COPY_MIN_STEPS, COPY_MIN_STEPS_LARGE = 4, 20


def batch_halves(be: Backend, k: Any, B: int, aux: dict[str, Any], steps: int) -> tuple[tuple[slice, Any], ...] | None:
    """((rows, Wt buffer), (rows, Wt buffer)): the batch's two halves (``split_rows``) for a gated recurrence,
    each with a buffer for its Wᵀ; or None: one loop. Each half keeps its own rows of every buffer; the second
    Wᵀ buffer is made once per workspace."""
    halves = split_rows(be, k.jit, B, aux["Wt"].shape[0], steps)  # Wt (H, G·H)
    if halves is None:
        return None
    if "Wt_half" not in aux:
        aux["Wt_half"] = be.xp.empty_like(aux["Wt"])
    return (halves[0], aux["Wt"]), (halves[1], aux["Wt_half"])


def forward_in_halves(
    forward_rows: Callable[..., None], pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, k: Any
) -> None:
    """A gated cell's forward over all steps: ``forward_rows(pre, p, S, aux, rows, Wt, be=be, k=k)`` for the whole
    batch, or for its two halves at once (``batch_halves``), each in its own thread with its rows and its own Wᵀ
    buffer (packed per thread). pre (T, B, G·H), S (T+1, B, H)."""
    halves = batch_halves(be, k, pre.shape[1], aux, pre.shape[0])
    if halves is None:
        forward_rows(pre, p, S, aux, slice(None), aux["Wt"], be=be, k=k)
        return
    be.run_concurrently([partial(forward_rows, pre, p, S, aux, rows, Wt, be=be, k=k) for rows, Wt in halves])


class GatedCell(Cell):
    """The base of the GRU and LSTM cells: no options, so equal by kind; the input bias is "b"; no nonlinearity."""

    input_bias = "b"

    def buffer_elements(self, T: int, B: int, H: int) -> int:
        """``Cell.buffer_elements``, and the second Wᵀ (H, G·H) that ``batch_halves`` adds to a workspace's buffers
        where the step loops may run as two halves (``split_rows``, ``splits``: B·H and T·B·H large enough;
        counted whether or not the backend runs them)."""
        return super().buffer_elements(T, B, H) + (H * self.gates * H if splits(B, H, T) else 0)

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> Cell:
        """The cell (it takes no options); InputError naming the option that does not apply."""
        if nonlinearity is not None:
            raise InputError(
                f"nonlinearity applies to cell='rnn' only among torch's cells; the {cls.option.upper()}'s gates use "
                f"σ and tanh as torch.{cls.torch_module}'s (leave nonlinearity unset), "
                f"got nonlinearity={nonlinearity!r}"
            )
        return super().from_options(None, **options)


def sig_grad(a: Any, W: Any) -> Any:
    """diag(a (1 − a)) W for every example: a (B, H), W (H, H) → (B, H, H) (a σ gate's step Jacobian)."""
    return (a * (1 - a))[:, :, None] * W[None]


def exp_in_place(a: Any, *, xp: Any) -> None:
    """a ← exp(a), in place, without NumPy's warnings for what σ = 1 / (1 + exp(−x)) expects: exp(−x) overflowing
    to inf (x ≪ 0: σ = 0 exactly) or underflowing to 0 (x ≫ 0: σ = 1)."""
    with np.errstate(over="ignore", under="ignore"):
        xp.exp(a, out=a)


def sigmoid_in_place(a: Any, *, xp: Any) -> None:
    """a ← σ(a) = 1 / (1 + exp(−a)), in place (the CUDA bodies' formula: accurate for a ≪ 0, where
    (1 + tanh(a/2)) / 2 is within a rounding of 0)."""
    xp.negative(a, out=a)
    with np.errstate(over="ignore", under="ignore"):  # exp(−a) = inf, 0 for a ≪ 0, a ≫ 0: σ = 0, 1 exactly
        xp.exp(a, out=a)
        a += 1
        xp.reciprocal(a, out=a)  # a subnormal σ just above exp's overflow
