"""Step loops run as one compiled call, and the batch split in two halves run at once: what the cells share on
the NumPy backend under MKL with numba (the ``jit`` extra).

A cell writes its whole forward and backward step loops as plain Python (a factory taking MKL's
``cblas_?gemm_compute``, ``v?Tanh`` (and ``v?Exp``, for the gated cells' σ) and its compiled kernels);
``step_loops`` compiles them (nogil) where they can run. ``split_rows`` says whether a recurrence's batch runs as
two halves in two threads.

A loop, and each compiled kernel it calls, takes the whole (T, B, ·) buffers and a range of rows r0..r1−1, not
the half's views: numba vectorises a loop over the rows of a C-contiguous array with SIMD, over those of a strided
view (a half's rows of every step) without; an LSTM half's forward loop took 5.3 ms on views against 4.4 ms
(T = 64, 16 of B = 32 rows, H = 256, 2-core VM).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ..backend import Backend
from ..backend._mkl import PackedMatrix
from ._jit import compile_loops

__all__ = ["SPLIT_MIN_STATE", "loops_possible", "over_rows", "split_rows", "splits", "step_loops"]

#: the smallest state (B·H elements) whose step loops run as two batch halves at once (tests lower it): on the
#: 2-core VM, with the compiled kernels, halves took 0.79–0.96× one loop's time at B·H = 8192 (B = 16, 32, 64)
#: and 1.0–1.45× at 4096
SPLIT_MIN_STATE = 8192
#: and the fewest steps (at B·H = SPLIT_MIN_STATE; in proportion fewer for a larger state: steps·B·H ≥
#: SPLIT_MIN_STEPS·SPLIT_MIN_STATE) that repay the two threads' start: whole forward+BPTT calls, halves ÷ one loop,
#: 2-core VM, B = 32, H = 256: Elman 1.44, 1.32, 0.97, 0.95 at T = 4, 8, 16, 64; LSTM 1.07, 1.10, 0.93, 0.79;
#: B = 64, H = 512 Elman 1.03, 1.01, 0.91, 0.76 at T = 2, 4, 8, 16 (``recompute``'s short segments ran 2.4× the
#: stored path's time with every segment split, 1.55× without)
SPLIT_MIN_STEPS = 16


def splits(B: int, H: int, steps: int) -> bool:
    """Whether a (B, H) state over ``steps`` steps is large enough for two batch halves (B·H ≥ SPLIT_MIN_STATE and
    steps·B·H ≥ SPLIT_MIN_STEPS·SPLIT_MIN_STATE, two rows and two steps at least): the size rule of
    ``split_rows``, which the memory estimate shares."""
    state = B * H
    return state >= SPLIT_MIN_STATE and steps * state >= SPLIT_MIN_STEPS * SPLIT_MIN_STATE and B >= 2 and steps >= 2


def split_rows(be: Backend, jit: Any, B: int, H: int, steps: int) -> tuple[slice, slice] | None:
    """The batch's two halves (slice, slice), for a recurrence's ``steps`` step loops run as two jobs at once
    (``be.run_concurrently``); or None: one loop (also for fewer than two steps: nothing to repay the threads).

    Only where the cell's compiled kernels ``jit`` run (numba releases the GIL, so the two loops overlap; with
    the NumPy twins' many small calls the threads measured slower), the backend runs jobs in threads (two cores
    or more, ``concurrent`` on, not already inside a job: the directions of a bidirectional layer) and the
    state (B, H) over ``steps`` is large enough (``splits``)."""
    threads = getattr(be, "blas_threads", None)
    if jit is None or threads is None or threads.most < 2 or not be.concurrent or B < 2 or steps < 2:
        return None
    if not splits(B, H, steps):
        return None
    half = (B + 1) // 2
    return slice(0, half), slice(half, B)


def over_rows(be: Backend, halves: tuple[slice, slice] | None, job: Callable[[slice], None]) -> None:
    """``job(rows)`` for the whole batch (``halves`` None: rows = slice(None)), or for each of ``split_rows``' two
    halves at once (``be.run_concurrently``)."""
    if halves is None:
        job(slice(None))
        return
    be.run_concurrently([partial(job, rows) for rows in halves])


def loops_possible(be: Backend, jit: Any) -> bool:
    """Whether a cell's compiled step loops (``step_loops``) can run on ``be`` at all: its compiled kernels ``jit``
    run, MKL does and the backend computes in FP32 (a tf32/bf16 view rounds its step weight instead of packing it).
    Each loop still needs its weight packed (``step_loops``)."""
    return jit is not None and getattr(be, "mkl", None) is not None and be.precision == "fp32"


def step_loops(
    jit: Any,
    be: Backend,
    w: Any,
    rows: int,
    arrays: tuple[Any, ...],
    factory: Callable[..., tuple[Any, ...]],
    *,
    exp: bool = False,
) -> tuple[Any, ...] | None:
    """A cell's whole step loops (``factory(compute, tanh, *jit)``, or ``factory(compute, tanh, exp, *jit)`` with
    ``exp``: VML's exp as well, for the gated cells' σ; a batch's or a half's T forward or backward
    steps as one compiled call, no Python and no GIL between steps), for the step weight ``w`` packed by MKL for
    ``rows`` rows and the loop's ``arrays``; None (the loop over steps in Python) unless the compiled kernels
    ``jit`` run, MKL packed ``w`` (``be.pack`` gave a PackedMatrix, not stale) and every array is a NumPy array
    of w's dtype with unit stride along rows and positive strides of whole elements, each row at least a row apart
    (what MKL takes as a leading dimension; and this MKL has the functions). Each loop runs with the calling
    thread's MKL on one thread (``Mkl.on_one_thread``)."""
    if jit is None or type(w) is not PackedMatrix or w.rows != rows or getattr(be, "mkl", None) is None:
        return None
    if w.slot.generation != w.generation:  # packed again since: the slot holds another matrix now
        return None
    char = w.dtype.char
    for x in arrays:
        if type(x) is not np.ndarray or x.dtype.char != char or x.strides[-1] != x.itemsize:
            return None
        if any(s <= 0 or s % x.itemsize for s in x.strides):
            return None
        if x.ndim >= 2 and x.strides[-2] < x.shape[-1] * x.itemsize:
            return None
    functions = be.mkl.loop_functions(char)
    if functions is None:
        return None
    loops = compile_loops(factory, be.mkl, char, *functions[: 3 if exp else 2], *jit)
    return tuple(partial(be.mkl.on_one_thread, loop) for loop in loops)  # MKL on one thread during each loop
