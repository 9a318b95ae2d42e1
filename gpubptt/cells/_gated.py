"""What the gated cells share: their identity (a parameter-free cell is equal to any of its kind) and the
layout of W for the per-step forward GEMM."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ..backend import Backend
from ..backend._mkl import PackedMatrix
from ..errors import InputError
from ._jit import compile_loops
from .base import Cell


def forward_weight(W: Any, Wt: Any, T: int, B: int, be: Backend) -> Any:
    """Wᵀ (H, G·H) for the step GEMM h_{t-1} @ Wᵀ: packed by the backend for B rows where it packs (MKL's
    packed B, made once per forward, reused by all T steps), else the transposed view of W (G·H, H) or
    its row-major copy in Wt.

    A BLAS on the CPU runs the step GEMM faster on a row-major Wᵀ (OpenBLAS on a 2-core CPU: 0.17 vs
    0.20 ms at B = 32, H = 256, G = 4; 5.1 vs 5.6 ms at B = 128, H = 1024, G = 3), but the transposed
    copy costs 0.4 and 19 ms there: it pays over a forward of T steps once T·B ≥ 8·H. A packed Wᵀ reads
    the view itself (packing transposes it).
    """
    view = W.T
    packed = be.pack(view, B, T)
    if packed is not view:
        return packed
    H = W.shape[1]
    if T * B >= 8 * H:
        Wt[...] = view  # once per forward
        return Wt
    return view


#: the smallest state (B·H elements) whose step loops run as two batch halves at once (tests lower it): on the
#: 2-core VM, with the compiled kernels, halves took 0.79–0.96× one loop's time at B·H = 8192 (B = 16, 32, 64)
#: and 1.0–1.45× at 4096
SPLIT_MIN_STATE = 8192


def batch_halves(be: Backend, k: Any, B: int, aux: dict[str, Any]) -> tuple[tuple[slice, Any], ...] | None:
    """((rows, Wt buffer), (rows, Wt buffer)): the batch's two halves, for a gated recurrence's step loops run
    as two jobs at once (``be.run_concurrently``), each with a buffer for its Wᵀ; or None: one loop.

    Only where the cell's step kernels ``k`` are compiled (numba releases the GIL, so the two loops overlap;
    with the NumPy twins' many small calls the threads measured slower), the backend runs jobs in threads
    (two cores or more, ``concurrent`` on, not already inside a job: the directions of a bidirectional layer)
    and B·H ≥ SPLIT_MIN_STATE. Each half keeps its own rows of every buffer; the second Wᵀ buffer is made
    once per workspace."""
    threads = getattr(be, "blas_threads", None)
    if k.jit is None or threads is None or threads.most < 2 or not be.concurrent or B < 2:
        return None
    if B * aux["Wt"].shape[0] < SPLIT_MIN_STATE:  # Wt (H, G·H)
        return None
    if "Wt_half" not in aux:
        aux["Wt_half"] = be.xp.empty_like(aux["Wt"])
    half = (B + 1) // 2
    return (slice(0, half), aux["Wt"]), (slice(half, B), aux["Wt_half"])


def forward_in_halves(
    forward_rows: Callable[..., None], pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, k: Any
) -> None:
    """A gated cell's forward over all steps: ``forward_rows(pre, p, S, aux, rows, Wt, be=be, k=k)`` for the whole
    batch, or for its two halves at once (``batch_halves``), each in its own thread with its rows and its own Wᵀ
    buffer (packed per thread). pre (T, B, G·H), S (T+1, B, H)."""
    halves = batch_halves(be, k, pre.shape[1], aux)
    if halves is None:
        forward_rows(pre, p, S, aux, slice(None), aux["Wt"], be=be, k=k)
        return
    be.run_concurrently([partial(forward_rows, pre, p, S, aux, rows, Wt, be=be, k=k) for rows, Wt in halves])


def step_loops(
    jit: Any, be: Backend, w: Any, rows: int, arrays: tuple[Any, ...], factory: Callable[..., tuple[Any, ...]]
) -> tuple[Any, ...] | None:
    """A cell's whole step loops (``factory(compute, tanh, *jit)``: a batch's or a half's T forward or backward
    steps as one compiled call, no Python and no GIL between steps), for the step weight ``w`` packed by MKL for
    ``rows`` rows and the loop's ``arrays``; None (the loop over steps in Python) unless the compiled kernels
    ``jit`` run, MKL packed ``w`` (``be.pack`` gave a PackedMatrix) and every array is a NumPy array of w's
    dtype with unit stride along rows (and this MKL has the functions). Each loop runs with the calling thread's MKL on
    one thread (``Mkl.on_one_thread``)."""
    if jit is None or type(w) is not PackedMatrix or w.rows != rows or getattr(be, "mkl", None) is None:
        return None
    char = w.dtype.char
    for x in arrays:
        if type(x) is not np.ndarray or x.dtype.char != char or x.strides[-1] != x.itemsize:
            return None
        if any(s % x.itemsize for s in x.strides):
            return None
    functions = be.mkl.loop_functions(char)
    if functions is None:
        return None
    loops = compile_loops(factory, be.mkl, char, *functions, *jit)
    return tuple(partial(be.mkl.on_one_thread, loop) for loop in loops)  # MKL on one thread during each loop


class GatedCell(Cell):
    """The base of the GRU and LSTM cells: no options, so equal by kind; the input bias is "b"; no nonlinearity."""

    input_bias = "b"

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
