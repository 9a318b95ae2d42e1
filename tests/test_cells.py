"""The Elman cell against its definitions: its kernels, its recurrences, its step Jacobian, its sources."""

from __future__ import annotations

from importlib import resources

import numpy as np

from gpubptt import engine
from gpubptt.cells import ElmanCell
from gpubptt.cells.elman import kernels


def test_fused_kernels_match_their_definitions(be, xp):
    rng = np.random.default_rng(0)
    pre, hw, s, g, carry = (rng.normal(size=(3, 4)) for _ in range(5))
    k = kernels(be)
    out = xp.empty((3, 4))
    k.tanh_step(be.asarray(pre), be.asarray(hw.copy()), out)
    np.testing.assert_allclose(be.to_numpy(out), np.tanh(pre + hw), rtol=1e-14)
    g_dev = be.asarray(g.copy())
    k.backprop_tanh(be.asarray(carry.copy()), be.asarray(1 - s**2), g_dev)
    np.testing.assert_allclose(be.to_numpy(g_dev), (g + carry) * (1 - s**2), rtol=1e-14)


def test_recurrences_and_factors_match_the_formulas_and_a_dense_jacobian(be):
    """forward: s_t = tanh(pre_t + W s_{t-1}); backward: δ_t = (g_t + δ_{t+1} W) ⊙ (1 − s_t²); the
    factor f_t gives ∂s_t/∂s_{t-1} = diag(f_t) W, checked against central differences of one step."""
    rng = np.random.default_rng(1)
    T, B, H = 5, 2, 4
    cell = ElmanCell()
    W, pre, s0, G = (
        rng.normal(size=(H, H)) * 0.6,
        rng.normal(size=(T, B, H)),
        rng.normal(size=(B, H)),
        rng.normal(size=(T, B, H)),
    )
    S = be.xp.zeros((T + 1, B, H))
    S[0] = be.asarray(s0)
    cell.forward(be.asarray(pre), be.asarray(W), S, be=be, scratch=be.xp.empty((B, H)))
    s, want = s0, [s0]
    for t in range(T):
        s = np.tanh(pre[t] + s @ W.T)
        want.append(s)
    np.testing.assert_allclose(be.to_numpy(S), np.stack(want), rtol=1e-12)
    F = cell.factors(S, be=be, out=be.xp.empty((T, B, H)))
    eps, t, b = 1e-6, 3, 1
    jac = np.empty((H, H))
    for j in range(H):
        e = np.zeros(H)
        e[j] = eps
        up = np.tanh(pre[t, b] + W @ (want[t][b] + e))
        down = np.tanh(pre[t, b] + W @ (want[t][b] - e))
        jac[:, j] = (up - down) / (2 * eps)
    np.testing.assert_allclose(np.diag(be.to_numpy(F)[t, b]) @ W, jac, rtol=1e-7, atol=1e-9)
    delta = be.asarray(G.copy())
    cell.backward(delta, be.asarray(W), F, be=be, carry=be.xp.empty((B, H)))
    f, d, ref = be.to_numpy(F), np.zeros((B, H)), np.empty_like(G)
    for t in range(T - 1, -1, -1):
        d = (G[t] + d @ W) * f[t]
        ref[t] = d
    np.testing.assert_allclose(be.to_numpy(delta), ref, rtol=1e-12)
    # truncation with a window that covers every step is full BPTT
    lanes = be.xp.empty((2, T, B, H))
    trunc = be.asarray(G.copy())
    engine.backward_truncated(cell, trunc, be.asarray(W), F, T - 1, be=be, lanes=lanes[0], spare=lanes[1])
    np.testing.assert_allclose(be.to_numpy(trunc), ref, rtol=1e-12)


def test_cuda_sources_ship_with_the_package():
    files = resources.files("gpubptt.cells")
    for name in ("elman_step.cu", "elman_persistent.cu"):
        text = files.joinpath(name).read_text(encoding="utf-8")
        assert 'extern "C" __global__ void fwd(' in text and 'extern "C" __global__ void bwd(' in text
