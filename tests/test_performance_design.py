"""The performance design, checked as properties (never as timings).

No allocation inside the time loops (tracemalloc sees NumPy's allocations), memory that grows as
O(T·B·H + chunk·B·K) rather than O(T·B·K), buffer reuse that never leaks into returned results,
and the cuBLAS layout logic of the GPU matmul, emulated on the CPU.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import get_backend
from gpubptt.backend._cublas import col_major as _col_major
from gpubptt.cells import ElmanCell
from gpubptt.cells.elman import backward_truncated
from gpubptt.engine.losses import chunk_steps

be = get_backend("numpy")
cell = ElmanCell()


def traced_peak(fn) -> int:
    """Peak bytes traced while fn runs, above what was allocated before it."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def loop_buffers(T, B=64, H=256, k=3, seed=0):
    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(H, H)) / np.sqrt(H)).astype(np.float32)
    pre = rng.normal(size=(T, B, H)).astype(np.float32)
    S = np.zeros((T + 1, B, H), np.float32)
    G = rng.normal(size=(T, B, H)).astype(np.float32)
    row = np.empty((B, H), np.float32)
    lanes = np.empty((2, k + 1, B, H), np.float32)
    return W, pre, S, G, row, lanes


def loop_runner(loop, W, pre, S, G, row, lanes):
    if loop == "forward":
        return lambda: cell.forward(pre, W, S, be=be, scratch=row)
    F = cell.factors(S, be=be, out=np.empty_like(G))
    if loop == "backward_full":
        return lambda: cell.backward(G, W, F, be=be, carry=row)
    return lambda: backward_truncated(cell, G, W, F, 3, be=be, lanes=lanes[0], spare=lanes[1])


@pytest.mark.parametrize("loop", ["forward", "backward_full", "backward_truncated"])
def test_time_loops_allocate_nothing_per_step(loop):
    """The bytes traced during a loop do not grow with T and stay below one (B, H) row.

    (B, H) is large enough here that a single per-step temporary would exceed the bound. At this size the
    loops run as two batch halves in threads where numba and MKL run (both T here have the steps for halves,
    ``_loops.splits``: a whole loop would allocate none of the hand-off): the Python objects of that hand-off
    (per call, not per step) peak up to ~1 KiB higher or lower as the two threads interleave, so each T's
    peak is the median of five calls.
    """
    peaks = {}
    for T in (12, 64):
        run = loop_runner(loop, *loop_buffers(T))
        run()  # warm-up: first calls may cache ufunc loops
        peaks[T] = int(np.median([traced_peak(run) for _ in range(5)]))
    assert peaks[64] <= peaks[12] + 1024, peaks
    assert peaks[64] < 64 * 256 * 4, peaks  # one (B, H) float32 row


def test_output_layer_memory_is_chunked_not_T_B_K():
    """K = 8000: peak extra memory stays O(T·B·H + chunk·B·K), far below one (T, B, K) array."""
    T, B, D, H, K = 128, 16, 32, 64, 8000
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, K, backend="numpy", seed=0)
    x = rng.integers(0, D, size=(T, B))
    y = rng.integers(0, K, size=(T, B))
    model.loss_and_grads(x, y)  # allocate the workspace once
    chunk = chunk_steps(T, B, K, model.backend.chunk_elements)
    assert chunk <= T // 4
    itemsize = 4
    tbk = T * B * K * itemsize
    bound = (8 * T * B * H + 3 * chunk * B * K + 4 * K * H + D * H) * itemsize
    fresh = gpubptt.RNN(D, H, K, backend="numpy", seed=0)  # pays for its buffers inside the trace
    peak = traced_peak(lambda: fresh.loss_and_grads(x, y))
    assert peak < bound, (peak, bound)
    assert peak < tbk / 2, (peak, tbk)


def test_returned_results_are_not_overwritten_by_later_calls():
    rng = np.random.default_rng(1)
    model = gpubptt.RNN(6, 8, 5, backend="numpy", seed=0, dtype="float64")
    x1, x2 = rng.integers(0, 6, size=(2, 7, 3))
    y = rng.integers(0, 5, size=(7, 3))
    l1, g1 = model.loss_and_grads(x1, y)
    kept = {k: v.copy() for k, v in g1.items()}
    l1_value = float(l1)
    l2, g2 = model.loss_and_grads(x2, y)  # same shape: same workspace
    assert float(l1) == l1_value and float(l2) != l1_value
    for k in kept:
        np.testing.assert_array_equal(g1[k], kept[k])
    # and reusing the workspace gives what a fresh model gives
    fresh = gpubptt.RNN.from_params(model.params, backend="numpy")
    l3, g3 = fresh.loss_and_grads(x2, y)
    assert float(l3) == float(l2)
    for k in g3:
        np.testing.assert_array_equal(g2[k], g3[k])


def test_parameter_updates_in_place_are_seen_by_the_next_call():
    rng = np.random.default_rng(2)
    model = gpubptt.RNN(6, 8, 5, backend="numpy", seed=0, dtype="float64")
    x = rng.integers(0, 6, size=(7, 3))
    y = rng.integers(0, 5, size=(7, 3))
    l1, _ = model.loss_and_grads(x, y)
    model.params["W"] *= 2.0
    l2, _ = model.loss_and_grads(x, y)
    fresh = gpubptt.RNN.from_params(model.params, backend="numpy")
    assert float(l2) != float(l1) and float(l2) == float(fresh.loss(x, y))


def cublas_gemm_emulated(a, b, out, accumulate):
    """What the CuPy matmul asks cuBLAS for, computed from raw memory with column-major rules."""

    def col_major(M, layout, rows, cols):
        transposed, ld = layout
        flat = np.lib.stride_tricks.as_strided(
            M, shape=(cols, ld) if cols else (0, ld), strides=(ld * M.itemsize, M.itemsize)
        )
        mem = flat[:, :rows].T  # column-major (rows, cols) matrix with leading dimension ld
        return mem.T if transposed else mem

    m, k = a.shape
    n = b.shape[1]
    la, lb, lc = _col_major(a), _col_major(b), _col_major(out)
    bt = col_major(b, lb, *((k, n) if lb[0] else (n, k)))  # op(X) = bᵀ (n, k)
    at = col_major(a, la, *((m, k) if la[0] else (k, m)))  # op(Y) = aᵀ (k, m)
    assert not lc[0]
    ct = bt @ at  # (n, m) = outᵀ
    c_mem = np.lib.stride_tricks.as_strided(out, shape=(m, n), strides=(lc[1] * out.itemsize, out.itemsize))
    if accumulate:
        c_mem += ct.T
    else:
        c_mem[...] = ct.T


@pytest.mark.parametrize("case", ["plain", "a_T", "b_T", "both_T", "row_views", "single_row"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cublas_layout_logic_matches_matmul(case, accumulate):
    rng = np.random.default_rng(3)
    m, k, n = 5, 4, 3
    A, Bm = rng.normal(size=(m, k)), rng.normal(size=(k, n))
    a = {"a_T": A.T.copy().T, "both_T": A.T.copy().T}.get(case, A)
    b = {"b_T": Bm.T.copy().T, "both_T": Bm.T.copy().T}.get(case, Bm)
    if case == "row_views":
        big = rng.normal(size=(3, m, k))
        a = big[1]
        A = a.copy()
    if case == "single_row":
        a, A = A[2:3], A[2:3].copy()
        m = 1
    out = rng.normal(size=(m, n))
    want = out + A @ Bm if accumulate else A @ Bm
    cublas_gemm_emulated(a, b, out, accumulate)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    assert _col_major(a) is not None and _col_major(b) is not None


def test_workspaces_are_cached_per_shape_and_bounded_least_recently_used_first():
    from gpubptt.model import MAX_WORKSPACES

    rng = np.random.default_rng(3)
    model = gpubptt.RNN(6, 8, 5, backend="numpy", seed=0)
    shapes = [(T, 2) for T in range(3, 4 + MAX_WORKSPACES)]  # one more shape than the cache holds
    for T, B in shapes:
        model.loss_and_grads(rng.integers(0, 6, size=(T, B)), rng.integers(0, 5, size=(T, B)))
    model.loss_and_grads(rng.integers(0, 6, size=(4, 2)), rng.integers(0, 5, size=(4, 2)), truncate=1)
    seen = [(w["T"], w["truncate"]) for w in model.workspaces()]
    assert len(seen) == MAX_WORKSPACES
    assert seen[-1] == (4, 1) and (3, None) not in seen  # the newest last; the oldest shapes went first
    assert all(w["captured"] is False and w["tokens"] for w in model.workspaces())  # NumPy captures no graph
