"""The Elman cell's step loops as one compiled call (numba, under MKL) and as two batch halves in two threads.

Forced on at small shapes (the size thresholds lowered), every loop checked to have run compiled, and the
gradients compared with float64 central differences of the reference (``tests.reference``), or with the
tutorial's truncated BPTT."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import _mkl, numpy_backend
from gpubptt.cells import _jit, _loops, elman
from tests.reference import numeric, ref_stack_loss, ref_tutorial_truncated_grads

pytestmark = pytest.mark.skipif(_mkl.load_mkl()[0] is None, reason="MKL unavailable: pip install mkl")


@pytest.fixture
def compiled(monkeypatch):
    """A NumPy backend on MKL with numba's step loops forced on at any size; returns (backend, the loops used:
    one entry per loop, None where it ran in Python)."""
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 1)
    used = []
    step_loops = elman._Kernels.step_loops
    monkeypatch.setattr(elman._Kernels, "step_loops", lambda *a: used.append(step_loops(*a)) or used[-1])
    be = numpy_backend.NumpyBackend(blas="mkl")
    be.blas_threads.most = max(2, be.blas_threads.most)  # halves need two threads, whatever the cores here
    return be, used


@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-6, 1e-8), ("float32", 2e-3, 2e-4)])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_whole_step_loops_match_central_differences_of_the_reference(nonlinearity, split, dtype, rtol, atol,
                                                                     compiled, monkeypatch):  # fmt: skip
    """Two layers, biases, ragged lengths and s0: each layer's forward and backward loop (or each half's) runs as
    one compiled call; loss and gradients as the float64 reference's."""
    be, used = compiled
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", 2 if split else 1 << 40)
    T, B, D, H, K, layers = 5, 5, 3, 4, 4, 2
    model = gpubptt.RNN(D, H, K, num_layers=layers, nonlinearity=nonlinearity, bias=True, backend=be, seed=3,
                        dtype=dtype)  # fmt: skip
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    lengths, s0 = np.array([5, 2, 4, 5, 1]), rng.normal(size=(layers, B, H)) * 0.5
    loss, grads = model.loss_and_grads(x.astype(dtype), y, s0.astype(dtype), lengths=lengths)
    assert len(used) == 2 * layers * (2 if split else 1) and all(u is not None for u in used)
    p = {k: np.array(v, dtype=np.float64) for k, v in model.params.items()}
    kw = dict(nonlinearity=nonlinearity, num_layers=layers)
    f = lambda: ref_stack_loss(p, x, y, s0, lengths, "sum", **kw)  # noqa: E731
    assert loss == pytest.approx(f(), rel=rtol)
    for name, arr in [*p.items(), ("s0", s0)]:
        idx = rng.choice(arr.size, min(arr.size, 8), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=rtol, atol=atol,
                                   err_msg=name)  # fmt: skip


def test_bidirectional_directions_run_their_loops_whole_inside_their_jobs(compiled, monkeypatch):
    """A bidirectional layer's directions already run as two jobs: each runs its loops whole (no halves inside a
    job), compiled; the gradients as the reference's."""
    be, used = compiled
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", 2)
    T, B, D, H, K = 4, 4, 3, 3, 4
    model = gpubptt.RNN(D, H, K, bidirectional=True, bias=True, backend=be, seed=5, dtype="float64")
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    loss, grads = model.loss_and_grads(x, y)
    assert len(used) == 4 and all(u is not None for u in used)  # 2 directions × (forward, backward), no halves
    p = {k: np.array(v) for k, v in model.params.items()}
    f = lambda: ref_stack_loss(p, x, y, bidirectional=True)  # noqa: E731
    assert loss == pytest.approx(f(), rel=1e-12)
    for name, arr in p.items():
        idx = rng.choice(arr.size, min(arr.size, 6), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


@pytest.mark.parametrize("truncate", [0, 2])
def test_truncated_bptt_after_a_compiled_forward_matches_the_tutorial(truncate, compiled, monkeypatch):
    """Truncation runs its own backward (lanes), after the compiled forward loop: as the tutorial's, one
    sequence at a time."""
    be, used = compiled
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", 2)
    T, B, D, H, K = 6, 4, 3, 5, 4
    model = gpubptt.RNN(D, H, K, bias=False, backend=be, seed=8, dtype="float64")
    rng = np.random.default_rng(8)
    x, y, s0 = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B)), rng.normal(size=(B, H)) * 0.5
    _, grads = model.loss_and_grads(x, y, s0, truncate=truncate)
    assert len(used) == 2 and all(u is not None for u in used)  # the forward's two halves
    want = ref_tutorial_truncated_grads({k: np.array(v) for k, v in model.params.items()}, x, y, truncate, s0)
    for name in ("U", "W", "V", "s0"):
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_a_loop_packs_the_weight_from_the_smallest_gemm_but_not_for_one_step():
    """``pack(loop=True)``: a weight packed for any GEMM MKL takes that runs twice or more; one step is not
    worth a pack; without ``loop`` the size thresholds stand."""
    be = numpy_backend.NumpyBackend(blas="mkl")
    W = np.ones((4, 4), dtype=np.float32)
    assert type(be.pack(W, 2, 8, loop=True)) is _mkl.PackedMatrix
    assert be.pack(W, 2, 1, loop=True) is W
    assert be.pack(W, 2, 8) is W  # (2 × 4)·(4 × 4): below MKL_MIN_FLOPS


def test_arrays_mkl_cannot_take_as_rows_and_a_stale_pack_run_the_python_loop(compiled, monkeypatch):
    """A state whose batch axis has stride 0 (a broadcast view: no leading dimension MKL takes) or a weight packed
    again since its handle was made: the step loop runs in Python, and right (the tanh recurrence in float64)."""
    be, used = compiled
    T, H = 4, 3
    rng = np.random.default_rng(2)
    W, pre = rng.normal(size=(H, H)) * 0.5, rng.normal(size=(T, 1, H))
    base = np.zeros((T + 1, H))
    S = base[:, None, :]  # (T+1, 1, H), strides (H·8, 0, 8)
    elman.ElmanCell().forward(pre, W, S, be=be, scratch=np.empty((1, H)))
    assert used == [None]
    s = np.zeros(H)
    for t in range(T):
        s = np.tanh(pre[t, 0] + W @ s)
        np.testing.assert_allclose(base[t + 1], s, rtol=1e-12)
    k = elman.kernels(be)
    handle = be.pack(W, 2, 8, loop=True)
    assert k.step_loops(be, handle, 2, (np.zeros((8, 2, H)),)) is not None
    be.pack(W.T, 2, 8, loop=True)  # the thread's slot now holds Wᵀ
    assert k.step_loops(be, handle, 2, (np.zeros((8, 2, H)),)) is None


def test_short_loops_run_whole_and_long_ones_as_halves(compiled, monkeypatch):
    """The halves' two threads repay their start only over enough steps (``_loops.splits``): a recomputed
    segment of 8 steps at B·H = SPLIT_MIN_STATE runs whole (it ran as halves, 2.4× the stored path's time), the
    stored 64-step loops of the same state as halves; the gradients equal."""
    be, used = compiled
    T, B, D, H, K = 64, 2, 3, 4, 5
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", B * H)
    model = gpubptt.RNN(D, H, K, backend=be, seed=2, dtype="float64")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    _, stored = model.loss_and_grads(x, y)
    assert len(used) == 4  # forward and backward, each as two halves
    used.clear()
    _, segments = model.loss_and_grads(x, y, recompute=8)  # 8 segments of 8 steps
    assert len(used) == 8 + 7 + 8  # each segment's forward, 7 recomputed (not the last) and 8 backward: whole
    for name in stored:
        np.testing.assert_allclose(segments[name], stored[name], rtol=1e-12, atol=1e-14, err_msg=name)
