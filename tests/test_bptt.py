"""BPTT gradients against independent references: finite differences, dense Jacobians, the tutorial loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpubptt
from tests.reference import numeric_grad, ref_loss, ref_tutorial_truncated_grads

T, B, D, H, K = 5, 3, 6, 4, 5


def make_case(
    seed, *, tokens=True, bias=False, with_s0=False, with_lengths=False, T=T, B=B, D=D, H=H, K=K, nonlinearity="tanh"
):
    rng = np.random.default_rng(seed)
    model = gpubptt.RNN(
        D, H, K, backend="numpy", dtype="float64", bias=bias, seed=seed, init="torch", nonlinearity=nonlinearity
    )
    # scale weights up a little so tanh is in its non-linear range and W matters
    for k in model.params:
        model.params[k] *= 2.0
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    s0 = rng.uniform(-0.5, 0.5, size=(B, H)) if with_s0 else None
    lengths = None
    if with_lengths:
        lengths = rng.integers(0, T + 1, size=B)
        lengths[0] = T  # at least one full sequence
        y = np.where(np.arange(T)[:, None] < lengths[None, :], y, 10**6)  # padded targets: any value
    return model, x, y, s0, lengths


def assert_close(got, want, rtol=1e-6, atol=1e-9, what=""):
    got, want = gpubptt.to_numpy(got), np.asarray(want)
    err = np.abs(got - want).max() / max(np.abs(want).max(), atol)
    assert err < rtol, f"{what}: relative error {err:.2e}"


COMBOS = list(itertools.product([True, False], [False, True], [False, True], [False, True], ["sum", "mean"]))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("tokens,bias,with_s0,with_lengths,reduction", COMBOS)
def test_bptt_matches_finite_differences(tokens, bias, with_s0, with_lengths, reduction, nonlinearity, blas):
    model, x, y, s0, lengths = make_case(
        1, tokens=tokens, bias=bias, with_s0=with_s0, with_lengths=with_lengths, nonlinearity=nonlinearity
    )
    params = {k: gpubptt.to_numpy(v).copy() for k, v in model.params.items()}
    s0_ref = np.zeros((B, H)) if s0 is None else s0.copy()

    def f():
        return ref_loss(params, x, y, s0_ref, lengths, reduction, nonlinearity=nonlinearity)

    loss, grads = model.loss_and_grads(x, y, s0, lengths=lengths, reduction=reduction)
    assert abs(float(loss) - f()) < 1e-10 * max(1.0, abs(f()))
    for name in params:
        assert_close(grads[name], numeric_grad(f, params[name]), what=name)
    assert_close(grads["s0"], numeric_grad(f, s0_ref), what="s0")


def test_bptt_matches_dense_jacobian_sum():
    """∂E/∂W = Σ_t Σ_{k≤t} ∂E_t/∂s_t · Π_{j=k+1..t} diag(1−s_j²) W · ∂⁺s_k/∂W, built explicitly."""
    model, x, y, _, _ = make_case(2, T=6, B=1)
    p = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    U, W, V = p["U"], p["W"], p["V"]
    Tn = x.shape[0]
    s = [np.zeros(H)]
    for t in range(Tn):
        s.append(np.tanh(U[:, x[t, 0]] + W @ s[-1]))
    dW = np.zeros((H, H))
    for t in range(Tn):
        z = V @ s[t + 1]
        yhat = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        dEt_ds = V.T @ (yhat - np.eye(K)[y[t, 0]])  # (H,)
        for k in range(t + 1):
            J = np.eye(H)  # ∂s_t/∂s_k = Π_{j=t..k+1} ∂s_j/∂s_{j−1}, as a dense matrix
            for j in range(t, k, -1):
                J = J @ (np.diag(1 - s[j + 1] ** 2) @ W)
            # ∂⁺s_k/∂W_{ab} = (1 − s_k[a]²) s_{k−1}[b] e_a: the immediate derivative
            g_k = (dEt_ds @ J) * (1 - s[k + 1] ** 2)
            dW += np.outer(g_k, s[k])
    _, grads = model.loss_and_grads(x, y)
    assert_close(grads["W"], dW, rtol=1e-12, what="W")


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("truncate", [0, 1, 2, 3])
@pytest.mark.parametrize("tokens", [True, False])
def test_truncated_bptt_matches_tutorial_loop(truncate, tokens, nonlinearity, blas):
    model, x, y, s0, _ = make_case(3, tokens=tokens, with_s0=True, T=6, nonlinearity=nonlinearity)
    params = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    want = ref_tutorial_truncated_grads(params, x, y, truncate, s0, nonlinearity=nonlinearity)
    _, grads = model.loss_and_grads(x, y, s0, truncate=truncate)
    for name in ("U", "W", "V", "s0"):
        assert_close(grads[name], want[name], rtol=1e-12, what=f"{name} truncate={truncate}")


@pytest.mark.parametrize("truncate", [T - 1, T, 100])
def test_truncate_at_least_T_minus_1_is_full_bptt(truncate):
    model, x, y, s0, lengths = make_case(4, with_s0=True, with_lengths=True, bias=True)
    _, full = model.loss_and_grads(x, y, s0, lengths=lengths)
    _, trunc = model.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate)
    for name in full:
        np.testing.assert_array_equal(trunc[name], full[name])


def test_truncated_differs_from_full_and_zero_window_has_no_recurrent_path():
    model, x, y, s0, _ = make_case(5, with_s0=True)
    _, full = model.loss_and_grads(x, y, s0)
    _, t0 = model.loss_and_grads(x, y, s0, truncate=0)
    assert np.abs(full["W"] - t0["W"]).max() > 1e-6
    # truncate=0: only E_0 reaches s0, through step 0 alone
    params = {k: gpubptt.to_numpy(v) for k, v in model.params.items()}
    want = ref_tutorial_truncated_grads(params, x, y, 0, s0)["s0"]
    assert_close(t0["s0"], want, rtol=1e-12, what="s0")


@given(
    T=st.integers(1, 7),
    B=st.integers(1, 4),
    D=st.integers(1, 6),
    H=st.integers(1, 6),
    K=st.integers(1, 6),
    tokens=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_directional_derivative_matches_central_difference(T, B, D, H, K, tokens, bias, seed):
    """For random shapes: ⟨grad, v⟩ equals (E(θ+εv) − E(θ−εv)) / 2ε for a random direction v."""
    model, x, y, s0, _ = make_case(seed, tokens=tokens, bias=bias, with_s0=True, T=T, B=B, D=D, H=H, K=K)
    rng = np.random.default_rng(seed + 1)
    _, grads = model.loss_and_grads(x, y, s0)
    base = {k: v.copy() for k, v in model.params.items()}
    dirs = {k: rng.normal(size=v.shape) for k, v in base.items()}
    dirs["s0"] = rng.normal(size=s0.shape)
    eps = 1e-6

    def loss_at(sign):
        for k in base:
            model.params[k] = base[k] + sign * eps * dirs[k]
        return float(model.loss(x, y, s0 + sign * eps * dirs["s0"]))

    numeric = (loss_at(1) - loss_at(-1)) / (2 * eps)
    model.params.update(base)
    analytic = sum(float((grads[k] * dirs[k]).sum()) for k in dirs)
    assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric))


def test_float32_agrees_with_float64():
    model64, x, y, s0, lengths = make_case(6, bias=True, with_s0=True, with_lengths=True, T=20, B=8, H=16, K=12, D=10)
    model32 = gpubptt.RNN.from_params(model64.params, backend="numpy", dtype="float32")
    l64, g64 = model64.loss_and_grads(x, y, s0, lengths=lengths)
    l32, g32 = model32.loss_and_grads(x, y, s0.astype(np.float32), lengths=lengths)
    assert g32["W"].dtype == np.float32 and l32.dtype == np.float32
    eps32 = np.finfo(np.float32).eps
    assert abs(float(l32) - float(l64)) <= 100 * eps32 * abs(float(l64))
    for k in g64:
        err = np.linalg.norm(g32[k] - g64[k]) / np.linalg.norm(g64[k])
        assert err < 1000 * eps32, f"{k}: {err:.2e}"


def test_mean_reduction_is_sum_over_counted_steps():
    model, x, y, _, lengths = make_case(7, with_lengths=True)
    ls, gs = model.loss_and_grads(x, y, lengths=lengths)
    lm, gm = model.loss_and_grads(x, y, lengths=lengths, reduction="mean")
    n = int(np.sum(lengths))
    assert float(lm) == pytest.approx(float(ls) / n, rel=1e-12)
    for k in gs:
        np.testing.assert_allclose(gm[k], gs[k] / n, rtol=1e-12, atol=1e-15)


def test_padded_steps_add_no_loss_and_no_gradient():
    """A padded batch gives the same loss and grads as the unpadded sequences one by one."""
    model, x, y, _, lengths = make_case(8, with_lengths=True)
    loss, grads = model.loss_and_grads(x, y, lengths=lengths)
    total, acc = 0.0, {k: 0.0 for k in grads if k != "s0"}
    for bi in range(x.shape[1]):
        n = int(lengths[bi])
        if n == 0:
            continue
        l1, g1 = model.loss_and_grads(x[:n, bi : bi + 1], y[:n, bi : bi + 1])
        total += float(l1)
        for k in acc:
            acc[k] = acc[k] + g1[k]
    assert float(loss) == pytest.approx(total, rel=1e-12)
    for k in acc:
        np.testing.assert_allclose(grads[k], acc[k], rtol=1e-10, atol=1e-13)
    assert np.all(grads["s0"][lengths == 0] == 0)


def test_output_chunking_does_not_change_results():
    """The output layer runs in time chunks; one chunk per step gives the same numbers as one chunk."""
    model, x, y, s0, lengths = make_case(9, bias=True, with_s0=True, with_lengths=True, T=9)
    l1, g1 = model.loss_and_grads(x, y, s0, lengths=lengths)
    assert [w["chunk"] for w in model.workspaces()] == [9]  # all T steps in one chunk
    fresh = gpubptt.RNN.from_params(model.params, backend=model.backend)
    fresh.chunk_elements = 1  # every chunk is one time step
    l2, g2 = fresh.loss_and_grads(x, y, s0, lengths=lengths)
    assert [w["chunk"] for w in fresh.workspaces()] == [1]
    assert float(l2) == pytest.approx(float(l1), rel=1e-13)
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-12, atol=1e-15)
