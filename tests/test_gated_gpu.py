"""GRU and LSTM on CuPy against NumPy: float64 to round-off, float32 against a float64 reference, the captured
CUDA graph against the plain loop, and the fused step kernels against their NumPy twins. Marked ``gpu``;
skipped with the reason where CuPy cannot run."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import get_backend
from gpubptt.cells import gru, lstm

CELLS = ["gru", "lstm"]


def _inputs(rng, cell, T, B, D, H, n, tokens):
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, 7, size=(T, B))
    h0 = rng.normal(size=(n, B, H)) * 0.3
    s0 = (h0, rng.normal(size=(n, B, H))) if cell == "lstm" else h0
    return x, y, s0


def _dev(be, a):
    return tuple(be.asarray(v) for v in a) if isinstance(a, tuple) else be.asarray(a)


def _host(a):
    return tuple(gpubptt.to_numpy(v) for v in a) if isinstance(a, tuple) else gpubptt.to_numpy(a)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_cupy_float64_matches_numpy(cupy_be, cell, layers, bidirectional):
    be = cupy_be
    rng = np.random.default_rng(5)
    ref = gpubptt.RNN(20, 32, 7, cell=cell, num_layers=layers, bidirectional=bidirectional, backend="numpy",
                      dtype="float64", bias=True, seed=4, init="torch")  # fmt: skip
    gpu = ref.to(be)
    for tokens, truncate in ((True, None), (False, None), (False, 3)):
        x, y, s0 = _inputs(rng, cell, 12, 6, 20, 32, ref.num_states, tokens)
        lengths = np.array([12, 5, 0, 1, 12, 7])
        l1, g1, f1 = ref.loss_and_grads(x, y, s0, lengths=lengths, return_final_state=True, truncate=truncate)
        l2, g2, f2 = gpu.loss_and_grads(be.asarray(x), be.asarray(y), _dev(be, s0), lengths=be.asarray(lengths),
                                        return_final_state=True, truncate=truncate)  # fmt: skip
        assert float(l2) == pytest.approx(float(l1), rel=1e-12)
        assert set(g1) == set(g2)
        for k in g1:
            np.testing.assert_allclose(gpubptt.to_numpy(g2[k]), g1[k], rtol=1e-10, atol=1e-12, err_msg=k)
        for a, b in zip(_host(f2) if cell == "lstm" else (_host(f2),), f1 if cell == "lstm" else (f1,), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        out = gpu.forward(be.asarray(x), _dev(be, s0), lengths=be.asarray(lengths))
        np.testing.assert_allclose(gpubptt.to_numpy(out.probs), ref.forward(x, s0, lengths=lengths).probs, rtol=1e-11)


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_cupy_float32_matches_float64_reference(cupy_be, cell):
    be = cupy_be
    rng = np.random.default_rng(6)
    ref = gpubptt.RNN(50, 64, 40, cell=cell, num_layers=2, backend="numpy", dtype="float64", seed=5, bias=True)
    gpu = gpubptt.RNN.from_params(ref.params, backend=be, dtype="float32")
    x, y = rng.integers(0, 50, size=(30, 16)), rng.integers(0, 40, size=(30, 16))
    l1, g1 = ref.loss_and_grads(x, y)
    l2, g2 = gpu.loss_and_grads(be.asarray(x), be.asarray(y))
    eps = np.finfo(np.float32).eps
    assert abs(float(l2) - float(l1)) <= 100 * eps * abs(float(l1))
    for k in g1:
        g = gpubptt.to_numpy(g2[k])
        assert np.linalg.norm(g - g1[k]) / max(np.linalg.norm(g1[k]), 1e-30) < 1000 * eps, k


@pytest.mark.gpu
@pytest.mark.parametrize("cell", CELLS)
def test_cuda_graph_replay_matches_plain_loop(cupy_be, cell):
    be = cupy_be
    rng = np.random.default_rng(7)
    graph = gpubptt.RNN(30, 48, 7, cell=cell, bidirectional=True, backend=be, dtype="float64", bias=True, seed=6)
    plain = gpubptt.RNN.from_params(graph.params, backend=be)
    plain.use_graphs = False
    for trial in range(3):  # the first call captures, later calls replay on new data
        x, y, s0 = _inputs(rng, cell, 16, 8, 30, 48, 2, trial % 2 == 0)
        kw = dict(lengths=be.asarray(rng.integers(0, 17, size=8)), reduction="mean" if trial else "sum",
                  truncate=2 if trial == 2 else None)  # fmt: skip
        l1, g1 = graph.loss_and_grads(be.asarray(x), be.asarray(y), _dev(be, s0), **kw)
        l2, g2 = plain.loss_and_grads(be.asarray(x), be.asarray(y), _dev(be, s0), **kw)
        assert float(l1) == pytest.approx(float(l2), rel=1e-12)
        for k in g1:
            np.testing.assert_allclose(gpubptt.to_numpy(g1[k]), gpubptt.to_numpy(g2[k]), rtol=1e-10, atol=1e-13)
    assert any(w["captured"] for w in graph.workspaces())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_gate_kernels_match_their_numpy_twins(cupy_be, dtype):
    be, host = cupy_be, get_backend("numpy")
    rng = np.random.default_rng(8)
    B, H = 5, 7
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)

    def arrays(*shapes):
        return [rng.normal(size=s).astype(dtype) for s in shapes]

    # GRU forward and backward
    pre, hw, bn, hprev = arrays((B, 3 * H), (B, 3 * H), (H,), (B, H))
    outs = {}
    for b in (host, be):
        h, A, tmp = b.xp.empty((B, H), dtype), b.xp.empty((B, 4 * H), dtype), b.xp.empty((3, B, H), dtype)
        gru.kernels(b).forward(b.asarray(pre), b.asarray(hw.copy()), b.asarray(bn), b.asarray(hprev), h, A, tmp)
        outs[b.name] = (gpubptt.to_numpy(h), gpubptt.to_numpy(A))
    for a, c in zip(outs["numpy"], outs["cupy"], strict=True):
        np.testing.assert_allclose(c, a, **tol)
    A = outs["numpy"][1]
    g, carry = arrays((B, H), (B, H))
    outs = {}
    for b in (host, be):
        dpre, dw, tmp = b.xp.empty((B, 3 * H), dtype), b.xp.empty((B, 3 * H), dtype), b.xp.empty((3, B, H), dtype)
        gru.kernels(b).backward(b.asarray(g.copy()), b.asarray(hprev), b.asarray(A), b.asarray(carry), dpre, dw, tmp)
        outs[b.name] = (gpubptt.to_numpy(dpre), gpubptt.to_numpy(dw), gpubptt.to_numpy(tmp[0]))
    for a, c in zip(outs["numpy"], outs["cupy"], strict=True):
        np.testing.assert_allclose(c, a, **tol)
    # LSTM forward and backward
    pre, hw, cprev = arrays((B, 4 * H), (B, 4 * H), (B, H))
    outs = {}
    for b in (host, be):
        h, c, A, tmp = (b.xp.empty(s, dtype) for s in ((B, H), (B, H), (B, 4 * H), (2, B, H)))
        lstm.kernels(b).forward(b.asarray(pre), b.asarray(hw), b.asarray(cprev), h, c, A, tmp)
        outs[b.name] = (gpubptt.to_numpy(h), gpubptt.to_numpy(c), gpubptt.to_numpy(A))
    for a, cc in zip(outs["numpy"], outs["cupy"], strict=True):
        np.testing.assert_allclose(cc, a, **tol)
    _, c, A = outs["numpy"]
    g, dhn, dc = arrays((B, H), (B, H), (B, H))
    outs = {}
    for b in (host, be):
        da, tmp, dcb = b.xp.empty((B, 4 * H), dtype), b.xp.empty((2, B, H), dtype), b.asarray(dc.copy())
        lstm.kernels(b).backward(b.asarray(g.copy()), b.asarray(dhn), b.asarray(cprev), b.asarray(c), b.asarray(A),
                                 dcb, da, tmp)  # fmt: skip
        outs[b.name] = (gpubptt.to_numpy(da), gpubptt.to_numpy(dcb))
    for a, cc in zip(outs["numpy"], outs["cupy"], strict=True):
        np.testing.assert_allclose(cc, a, **tol)
