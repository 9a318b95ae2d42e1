"""The Elman cell against its definitions: its kernels, its recurrences, its step Jacobian, its sources."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from gpubptt.cells import ElmanCell
from gpubptt.cells.elman import backward_truncated, kernels
from tests.reference import phi


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


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_recurrences_and_factors_match_the_formulas_and_a_dense_jacobian(be, nonlinearity):
    """forward: s_t = φ(pre_t + W s_{t-1}); backward: δ_t = (g_t + δ_{t+1} W) ⊙ φ'; the factor f_t
    gives ∂s_t/∂s_{t-1} = diag(f_t) W, checked against central differences of one step."""
    rng = np.random.default_rng(1)
    T, B, H = 5, 2, 4
    cell = ElmanCell(nonlinearity)
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
        s = phi(pre[t] + s @ W.T, nonlinearity)
        want.append(s)
    if nonlinearity == "relu":  # the case has both sides of the kink
        assert (np.stack(want[1:]) == 0).any() and (np.stack(want[1:]) > 0).any()
    np.testing.assert_allclose(be.to_numpy(S), np.stack(want), rtol=1e-12)
    F = cell.factors(S, be=be, out=be.xp.empty((T, B, H)))
    eps, t, b = 1e-6, 3, 1
    jac = np.empty((H, H))
    for j in range(H):
        e = np.zeros(H)
        e[j] = eps
        up = phi(pre[t, b] + W @ (want[t][b] + e), nonlinearity)
        down = phi(pre[t, b] + W @ (want[t][b] - e), nonlinearity)
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
    backward_truncated(cell, trunc, be.asarray(W), F, T - 1, be=be, lanes=lanes[0], spare=lanes[1])
    np.testing.assert_allclose(be.to_numpy(trunc), ref, rtol=1e-12)


def test_cuda_sources_ship_with_the_package():
    files = resources.files("gpubptt.cells")
    for name in ("elman_step.cu", "elman_persistent.cu"):
        text = files.joinpath(name).read_text(encoding="utf-8")
        assert 'extern "C" __global__ void fwd(' in text and 'extern "C" __global__ void bwd(' in text


def test_relu_step_kernel_matches_its_definition(be, xp):
    rng = np.random.default_rng(2)
    pre, hw = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    out = xp.empty((3, 4))
    kernels(be).relu_step(be.asarray(pre), be.asarray(hw.copy()), out)
    np.testing.assert_array_equal(be.to_numpy(out), np.maximum(pre + hw, 0))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_rnn_autograd_in_float64(nonlinearity, bias):
    """nn.RNN(nonlinearity) + Linear + cross_entropy(sum) on the same weights: loss, every gradient, h_n."""
    torch = pytest.importorskip("torch")
    import gpubptt

    rng = np.random.default_rng(4)
    T, B, D, H, K = 6, 3, 5, 7, 4
    model = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", bias=bias, init="torch", seed=3,
                        nonlinearity=nonlinearity)  # fmt: skip
    x, y, s0 = rng.normal(size=(T, B, D)), rng.integers(0, K, size=(T, B)), rng.normal(size=(B, H)) * 0.5
    loss, grads, final = model.loss_and_grads(x, y, s0, return_final_state=True)
    p = {k: torch.tensor(np.asarray(v), requires_grad=True) for k, v in model.params.items()}
    rnn = torch.nn.RNN(D, H, nonlinearity=nonlinearity, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(p["U"])
        rnn.weight_hh_l0.copy_(p["W"])
        if bias:  # torch's two biases: the loss depends on their sum, b
            rnn.bias_ih_l0.copy_(p["b"])
            rnn.bias_hh_l0.zero_()
    h0 = torch.tensor(s0[None], requires_grad=True)
    out, h_n = rnn(torch.tensor(x), h0)
    z = out @ p["V"].T + (p["c"] if bias else 0)
    tl = torch.nn.functional.cross_entropy(z.reshape(T * B, K), torch.tensor(y.reshape(-1)), reduction="sum")
    tl.backward()
    assert float(loss) == pytest.approx(tl.item(), rel=1e-12)
    np.testing.assert_allclose(final, h_n[0].detach().numpy(), rtol=1e-12, atol=1e-14)
    want = {"U": rnn.weight_ih_l0.grad, "W": rnn.weight_hh_l0.grad, "V": p["V"].grad, "s0": h0.grad[0]}
    if bias:
        want.update(b=rnn.bias_ih_l0.grad, c=p["c"].grad)
    for k, g in want.items():
        np.testing.assert_allclose(grads[k], g.numpy(), rtol=1e-10, atol=1e-12, err_msg=k)


def test_copies_made_by_gradcheck_and_diagnostics_keep_the_nonlinearity(monkeypatch):
    """gradcheck checks a float64 copy of the model: it must be a relu model too (a tanh copy would
    pass its own check and say nothing about the relu model)."""
    import gpubptt
    from gpubptt import diagnostics
    from gpubptt.model import RNN

    made = []
    real = RNN.from_params.__func__

    def recording(cls, *args, **kwargs):
        copy = real(cls, *args, **kwargs)
        made.append(copy.nonlinearity)
        return copy

    monkeypatch.setattr(RNN, "from_params", classmethod(recording))
    rng = np.random.default_rng(6)
    model = gpubptt.RNN(5, 6, 4, backend="numpy", dtype="float32", init="torch", seed=2, nonlinearity="relu")
    x, y = rng.integers(0, 5, size=(5, 3)), rng.integers(0, 4, size=(5, 3))
    assert gpubptt.gradcheck(model, x, y).max_rel_error < 1e-4
    assert made == ["relu"]
    assert diagnostics.with_spectral_radius(model, 0.9).nonlinearity == "relu"
    assert model.to("numpy").nonlinearity == "relu"
