"""Gradient-flow diagnostics against exact references: dense Jacobians, closed forms, the core BPTT.

The references build every step Jacobian ∂s_j/∂s_{j−1} = diag(1 − s_j²) W explicitly, one example
at a time in float64, from states computed by tests/reference.py (no code shared with the package).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

import gpubptt
from gpubptt import diagnostics as dg
from gpubptt.cli import app
from tests.images import assert_png_drawn
from tests.reference import ref_forward_one, ref_tutorial_truncated_grads

runner = CliRunner()


# -- dense references -----------------------------------------------------------------------------
def make_case(be, seed, *, T=6, B=3, D=5, H=4, K=5, bias=False, with_s0=False, gain=2.0, dense_x=False):
    """A float64 model with weights large enough that tanh bends and W matters; host inputs."""
    rng = np.random.default_rng(seed)
    model = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", bias=bias, seed=seed, init="torch")
    params = {k: gain * v for k, v in model.params.items()}
    model = gpubptt.RNN.from_params(params, backend=be, dtype="float64")
    x = rng.normal(size=(T, B, D)) if dense_x else rng.integers(0, D, size=(T, B))
    y = rng.integers(0, K, size=(T, B))
    s0 = rng.uniform(-0.8, 0.8, size=(B, H)) if with_s0 else None
    return model, x, y, s0


def host_params(model):
    return {k: gpubptt.to_numpy(v) for k, v in model.params.items()}


def ref_states(params, x, s0):
    """S (T+1, B, H) with S[0] = s0 and S[t+1] = s_t, one example at a time."""
    T, B = x.shape[:2]
    H = params["W"].shape[0]
    S = np.zeros((T + 1, B, H))
    for b in range(B):
        h0 = np.zeros(H) if s0 is None else s0[b]
        S[0, b] = h0
        S[1:, b] = ref_forward_one(params, x[:, b], h0)
    return S


def ref_direct(params, S, y):
    """∂E_t/∂s_t = Vᵀ (softmax(V s_t + c) − onehot(y_t)) for every t and example: (T, B, H)."""
    V, c = params["V"], params.get("c", 0.0)
    T, B = y.shape
    g = np.zeros((T, B, V.shape[1]))
    for t in range(T):
        for b in range(B):
            z = V @ S[t + 1, b] + c
            p = np.exp(z - z.max())
            p /= p.sum()
            p[y[t, b]] -= 1
            g[t, b] = V.T @ p
    return g


def jac(params, S, j, b):
    """The dense step Jacobian ∂s_j/∂s_{j−1} = diag(1 − s_j²) W of example b (H, H)."""
    return np.diag(1 - S[j + 1, b] ** 2) @ params["W"]


def jac_product(params, S, t, k, b):
    """∂s_t/∂s_k = J_t J_{t−1} ⋯ J_{k+1}, built densely (k may be −1: the initial state)."""
    P = np.eye(params["W"].shape[0])
    for j in range(k + 1, t + 1):
        P = jac(params, S, j, b) @ P
    return P


# -- 1. per-step gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("bias,with_s0,dense_x", [(False, False, False), (True, True, False), (False, True, True)])
def test_step_gradients_match_dense_jacobians(be, bias, with_s0, dense_x):
    model, x, y, s0 = make_case(be, 1, bias=bias, with_s0=with_s0, dense_x=dense_x)
    p = host_params(model)
    S = ref_states(p, x, s0)
    direct = ref_direct(p, S, y)
    T, B, H = direct.shape
    total = np.zeros_like(direct)  # ∂E/∂s_t = Σ_{t' ≥ t} (∂s_t'/∂s_t)ᵀ ∂E_t'/∂s_t'
    ds0 = np.zeros((B, H))
    for b in range(B):
        for t in range(T):
            for t2 in range(t, T):
                total[t, b] += jac_product(p, S, t2, t, b).T @ direct[t2, b]
        for t2 in range(T):
            ds0[b] += jac_product(p, S, t2, -1, b).T @ direct[t2, b]
    fro = lambda a: np.sqrt((a**2).sum(axis=(1, 2)))  # noqa: E731
    got = dg.step_gradients(model, be.asarray(x), be.asarray(y), None if s0 is None else be.asarray(s0))
    np.testing.assert_allclose(got.direct, fro(direct), rtol=1e-10)
    np.testing.assert_allclose(got.through_time, fro(total - direct), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(got.total, fro(total), rtol=1e-10)
    assert got.through_time[-1] == 0  # nothing comes after the last step
    np.testing.assert_allclose(got.s0, np.sqrt((ds0**2).sum()), rtol=1e-10)
    _, grads = model.loss_and_grads(be.asarray(x), be.asarray(y), None if s0 is None else be.asarray(s0))
    np.testing.assert_allclose(got.s0, np.linalg.norm(gpubptt.to_numpy(grads["s0"])), rtol=1e-10)


# -- 2. the double sum, term by term --------------------------------------------------------------
def ref_terms(p, S, direct):
    """Every term Σ_b δ_k^{(t)}[b] s_{k−1}[b]ᵀ of ∂E/∂W, densely: (T, T, H, H)."""
    T, B, H = direct.shape
    terms = np.zeros((T, T, H, H))
    for t in range(T):
        for k in range(t + 1):
            for b in range(B):
                # δ_k^{(t)} = diag(1 − s_k²) (∂s_t/∂s_k)ᵀ ∂E_t/∂s_t
                delta = (1 - S[k + 1, b] ** 2) * (jac_product(p, S, t, k, b).T @ direct[t, b])
                terms[t, k] += np.outer(delta, S[k, b])
    return terms


@pytest.mark.parametrize("B,H", [(3, 4), (6, 3)], ids=["gram-B<=H", "outer-B>H"])
def test_contributions_match_dense_jacobians(be, B, H):
    model, x, y, s0 = make_case(be, 2, B=B, H=H, with_s0=True, bias=True)
    p = host_params(model)
    S = ref_states(p, x, s0)
    want = ref_terms(p, S, ref_direct(p, S, y))
    got = dg.contributions(model, be.asarray(x), be.asarray(y), be.asarray(s0), keep_terms=True)
    np.testing.assert_allclose(got.terms, want, rtol=1e-10, atol=1e-13)
    want_norms = np.sqrt((want**2).sum(axis=(2, 3)))
    np.testing.assert_allclose(got.norms, want_norms, rtol=1e-8, atol=1e-12)
    assert np.all(np.triu(got.norms, 1) == 0)
    plain = dg.contributions(model, be.asarray(x), be.asarray(y), be.asarray(s0))
    assert plain.terms is None
    np.testing.assert_allclose(plain.norms, got.norms, rtol=1e-12, atol=1e-15)


def test_contributions_sum_to_core_bptt_gradient(be):
    """Σ_k of row t is ∂E_t/∂W; Σ over t and k is the core library's dW."""
    model, x, y, s0 = make_case(be, 3, T=7, B=2, H=5, with_s0=True)
    T, B = y.shape
    xb, yb, s0b = be.asarray(x), be.asarray(y), be.asarray(s0)
    got = dg.contributions(model, xb, yb, s0b, keep_terms=True)
    _, grads = model.loss_and_grads(xb, yb, s0b)
    dW = gpubptt.to_numpy(grads["W"])
    np.testing.assert_allclose(got.terms.sum(axis=(0, 1)), dW, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got.dW_norm, np.linalg.norm(dW), rtol=1e-10)
    # ∂E_t/∂W from the core library: the loss over steps < t+1 minus the loss over steps < t
    prev = np.zeros_like(dW)
    for t in range(T):
        _, g = model.loss_and_grads(xb, yb, s0b, lengths=be.asarray(np.full(B, t + 1)))
        upto = gpubptt.to_numpy(g["W"])
        np.testing.assert_allclose(got.terms[t].sum(axis=0), upto - prev, rtol=1e-9, atol=1e-12)
        prev = upto


def test_contributions_column_zero_vanishes_with_zero_initial_state():
    model, x, y, _ = make_case(gpubptt.get_backend("numpy"), 4)
    got = dg.contributions(model, x, y)
    assert np.all(got.norms[:, 0] == 0) and np.all(np.diag(got.norms)[1:] > 0)


@given(
    T=st.integers(1, 6),
    B=st.integers(1, 4),
    H=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_contributions_sum_to_core_dW_for_any_shape(T, B, H, seed):
    model, x, y, s0 = make_case(gpubptt.get_backend("numpy"), seed, T=T, B=B, H=H, with_s0=True)
    got = dg.contributions(model, x, y, s0, keep_terms=True)
    _, grads = model.loss_and_grads(x, y, s0)
    np.testing.assert_allclose(got.terms.sum(axis=(0, 1)), grads["W"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.norms, np.sqrt((got.terms**2).sum(axis=(2, 3))), rtol=1e-7, atol=1e-10)


# -- 3. Jacobian products -------------------------------------------------------------------------
def orthogonal(H, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(H, H)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("a", [0.5, 0.9, 1.0, 1.7])
def test_linear_recurrence_with_scaled_orthogonal_W_has_norm_a_to_the_lag(be, a):
    T, B, D, H, K = 40, 3, 5, 6, 4
    base = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", seed=0)
    params = {**host_params(base), "W": a * orthogonal(H, 1)}
    model = gpubptt.RNN.from_params(params, backend=be, dtype="float64")
    x = be.asarray(np.random.default_rng(0).integers(0, D, size=(T, B)))
    got = dg.jacobian_products(model, x, activation="linear", iters=3, threshold=1e-3)
    lags = np.arange(T)
    np.testing.assert_array_equal(got.lags, lags)
    np.testing.assert_allclose(got.norms, a**lags, rtol=1e-11)
    np.testing.assert_allclose(got.norms_per_example, np.repeat((a**lags)[:, None], B, axis=1), rtol=1e-11)
    np.testing.assert_allclose(got.decay_rate, a, rtol=1e-11)
    np.testing.assert_allclose(got.log_slope, np.log(a), atol=1e-11)
    np.testing.assert_allclose([got.spectral_radius, got.spectral_norm], [a, a], rtol=1e-12)
    want_horizon = next((int(lag) for lag in lags if a**lag < 1e-3), None)
    assert got.horizon == want_horizon
    if a < 1:
        np.testing.assert_allclose(got.horizon_fit, np.log(1e-3) / np.log(a), rtol=1e-9)
    else:
        assert got.horizon_fit is None
    assert got.converged


def test_product_norms_of_identity_factors_are_powers_of_orthogonal_scale():
    """The raw-factor entry point: factors of ones are the linear recurrence, a·Q gives a^lag."""
    a, n, B, H = 0.8, 12, 2, 5
    W = a * orthogonal(H, 2)
    got = dg.product_norms(W, np.ones((n, B, H)), xp=np, iters=2)
    np.testing.assert_allclose(got.log_norms, np.repeat((np.arange(n + 1) * np.log(a))[:, None], B, 1), atol=1e-12)


@pytest.mark.parametrize("end", [None, 3])
def test_jacobian_products_match_dense_svd(be, end):
    model, x, _, s0 = make_case(be, 5, T=8, B=3, H=5, with_s0=True)
    p = host_params(model)
    S = ref_states(p, x, s0)
    t = 7 if end is None else end
    got = dg.jacobian_products(model, be.asarray(x), be.asarray(s0), end=end, iters=5000, tol=1e-14)
    want = np.array([[np.linalg.norm(jac_product(p, S, t, t - lag, b), 2) for b in range(3)] for lag in range(t + 1)])
    np.testing.assert_allclose(got.norms_per_example, want, rtol=1e-8)
    np.testing.assert_allclose(got.norms, np.exp(np.log(want).mean(axis=1)), rtol=1e-8)
    assert got.end == t and got.activation == "tanh" and got.converged
    eig = np.abs(np.linalg.eigvals(p["W"])).max()
    np.testing.assert_allclose([got.spectral_radius, got.spectral_norm], [eig, np.linalg.svd(p["W"])[1][0]], rtol=1e-10)
    np.testing.assert_allclose(got.saturated_fraction, (np.abs(S[1:]) > 0.99).mean())
    slope, intercept = np.polyfit(np.arange(1, t + 1), np.log(got.norms[1:]), 1)
    np.testing.assert_allclose([got.log_slope, got.decay_rate], [slope, np.exp(slope)], rtol=1e-10)
    np.testing.assert_allclose(got.log_intercept, intercept, rtol=1e-10, atol=1e-12)


def test_jacobian_products_of_one_example_match_dense_svd():
    be = gpubptt.get_backend("numpy")
    model, x, _, _ = make_case(be, 14, T=7, B=4, H=5)
    p = host_params(model)
    S = ref_states(p, x, None)
    got = dg.jacobian_products(model, x, example=2, iters=5000, tol=1e-14)
    want = [np.linalg.norm(jac_product(p, S, 6, 6 - lag, 2), 2) for lag in range(7)]
    np.testing.assert_allclose(got.norms, want, rtol=1e-8)
    assert got.norms_per_example.shape == (7, 1) and got.example == 2
    np.testing.assert_allclose(got.saturated_fraction, (np.abs(S[1:, 2]) > 0.99).mean())
    with pytest.raises(gpubptt.InputError, match="example must index the batch"):
        dg.jacobian_products(model, x, example=4)


def test_saturated_units_kill_the_product():
    """States pinned at ±1 make 1 − s² vanish: the product norm falls far below the linear one."""
    be = gpubptt.get_backend("numpy")
    model, x, _, _ = make_case(be, 6, T=10, B=2, H=4, gain=40.0)
    tanh = dg.jacobian_products(model, x, iters=200)
    linear = dg.jacobian_products(model, x, activation="linear", iters=200)
    assert tanh.saturated_fraction > 0.5
    assert tanh.norms[-1] < 1e-3 * linear.norms[-1]


# -- 4. truncation bias ---------------------------------------------------------------------------
def test_truncation_bias_matches_tutorial_reference(be):
    model, x, y, s0 = make_case(be, 7, T=6, B=2, H=4, with_s0=True)
    p = host_params(model)
    T = y.shape[0]
    full = ref_tutorial_truncated_grads(p, x, y, truncate=T, s0=s0)
    names = ["U", "W", "V"]
    flat = lambda g: np.concatenate([g[n].ravel() for n in names])  # noqa: E731
    got = dg.truncation_bias(model, be.asarray(x), be.asarray(y), be.asarray(s0), truncates=[0, 1, 3, T - 2])
    for i, k in enumerate([0, 1, 3, T - 2]):
        g = ref_tutorial_truncated_grads(p, x, y, truncate=k, s0=s0)
        want_rel = np.linalg.norm(flat(full) - flat(g)) / np.linalg.norm(flat(full))
        want_cos = flat(full) @ flat(g) / (np.linalg.norm(flat(full)) * np.linalg.norm(flat(g)))
        np.testing.assert_allclose(got.rel_error[i], want_rel, rtol=1e-8)
        np.testing.assert_allclose(got.cosine[i], want_cos, rtol=1e-10)
        for n in [*names, "s0"]:
            want_n = np.linalg.norm(full[n] - g[n]) / np.linalg.norm(full[n])
            np.testing.assert_allclose(got.by_param[n][i], want_n, rtol=1e-8, atol=1e-15)
        assert got.by_param["V"][i] == 0  # the output layer never sees truncation
    assert got.rel_error[0] > 0


def test_truncation_bias_is_zero_from_T_minus_1_on(be):
    model, x, y, _ = make_case(be, 8, T=5, bias=True)
    got = dg.truncation_bias(model, be.asarray(x), be.asarray(y))
    np.testing.assert_array_equal(got.truncate, np.arange(5))
    assert got.rel_error[-1] == 0 and got.cosine[-1] == pytest.approx(1.0, abs=1e-12)
    late = dg.truncation_bias(model, be.asarray(x), be.asarray(y), truncates=[4, 5, 100])
    np.testing.assert_array_equal(late.rel_error, 0)
    assert np.all(got.rel_error[:-1] > 0)


# -- rescaling, reports, JSON ---------------------------------------------------------------------
def test_with_spectral_radius_rescales_only_W(be):
    model, *_ = make_case(be, 9, H=6)
    for r in [0.3, 1.0, 2.5]:
        m = dg.with_spectral_radius(model, r)
        W = gpubptt.to_numpy(m.params["W"])
        np.testing.assert_allclose(np.abs(np.linalg.eigvals(W)).max(), r, rtol=1e-12)
        np.testing.assert_allclose(gpubptt.to_numpy(m.params["U"]), gpubptt.to_numpy(model.params["U"]))
        assert m.backend is model.backend and m.dtype == model.dtype


def test_vanish_sweep_to_dict_is_strict_json():
    model, x, y, _ = make_case(gpubptt.get_backend("numpy"), 10, T=5)
    sweep = dg.vanish_sweep(model, x, y, [0.5, 3.0], iters=20)
    assert [r for r, _ in sweep] == [0.5, 3.0]
    text = json.dumps([rep.to_dict() for _, rep in sweep], allow_nan=False)
    data = json.loads(text)
    assert set(data[0]) == {"steps", "contributions", "products", "truncation"}
    assert len(data[0]["contributions"]["norms"]) == 5 and "terms" not in data[0]["contributions"]
    assert data[1]["products"]["spectral_radius"] == pytest.approx(3.0)


def test_vanish_sweep_none_measures_W_as_it_is(be):
    model, x, y, _ = make_case(be, 14, T=5, H=6)
    xb, yb = be.asarray(x), be.asarray(y)
    W0 = host_params(model)["W"].copy()
    own = np.abs(np.linalg.eigvals(W0)).max()
    sweep = dg.vanish_sweep(model, xb, yb, [None, 0.5], iters=50)
    np.testing.assert_allclose([r for r, _ in sweep], [own, 0.5], rtol=1e-12)
    np.testing.assert_allclose([rep.products.spectral_radius for _, rep in sweep], [own, 0.5], rtol=1e-12)
    np.testing.assert_array_equal(host_params(model)["W"], W0)  # the model itself is not rescaled


def test_float32_model_agrees_with_float64(be):
    model64, x, y, _ = make_case(be, 11, T=12, B=4, H=8, gain=1.0)
    model32 = gpubptt.RNN.from_params(model64.params, backend=be, dtype="float32")
    xb, yb = be.asarray(x), be.asarray(y)
    a, b = dg.vanish_report(model64, xb, yb, iters=300, tol=1e-9), dg.vanish_report(model32, xb, yb, iters=300)
    np.testing.assert_allclose(b.steps.total, a.steps.total, rtol=1e-4)
    np.testing.assert_allclose(b.contributions.norms, a.contributions.norms, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(b.products.norms, a.products.norms, rtol=1e-3)


def test_cupy_matches_numpy(cupy_be):
    model, x, y, s0 = make_case(gpubptt.get_backend("numpy"), 12, T=9, B=3, H=6, with_s0=True)
    gpu = model.to(cupy_be)
    a = dg.vanish_report(model, x, y, s0, iters=500, tol=1e-12)
    b = dg.vanish_report(gpu, cupy_be.asarray(x), cupy_be.asarray(y), cupy_be.asarray(s0), iters=500, tol=1e-12)
    np.testing.assert_allclose(b.steps.total, a.steps.total, rtol=1e-10)
    np.testing.assert_allclose(b.contributions.norms, a.contributions.norms, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(b.products.norms, a.products.norms, rtol=1e-6)
    np.testing.assert_allclose(b.truncation.rel_error, a.truncation.rel_error, rtol=1e-8, atol=1e-14)


# -- bad input: clear errors before any work ------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
    model, x, y, _ = make_case(gpubptt.get_backend("numpy"), 13)
    with pytest.raises(gpubptt.InputError, match="activation"):
        dg.jacobian_products(model, x, activation="relu")
    with pytest.raises(gpubptt.InputError, match=r"end must be a step in \[0, T\)"):
        dg.jacobian_products(model, x, end=6)
    with pytest.raises(gpubptt.InputError, match="threshold"):
        dg.jacobian_products(model, x, threshold=0)
    with pytest.raises(gpubptt.InputTypeError, match="iters"):
        dg.jacobian_products(model, x, iters=2.5)
    with pytest.raises(gpubptt.InputTypeError, match=r"gpubptt\.RNN"):
        dg.step_gradients("model", x, y)
    with pytest.raises(gpubptt.ShapeError, match="targets y"):
        dg.contributions(model, x, y[:-1])
    with pytest.raises(gpubptt.InputError, match="radius"):
        dg.with_spectral_radius(model, -1.0)
    with pytest.raises(gpubptt.InputError, match="truncate"):
        dg.truncation_bias(model, x, y, truncates=[-1])
    with pytest.raises(gpubptt.InputError, match="radius"):
        dg.vanish_sweep(model, x, y, [1.0, float("nan")])


# -- the command line -----------------------------------------------------------------------------
TINY = ["vanish", "--backend", "numpy", "--seq-len", "6", "--hidden", "5", "--batch", "2", "--vocab", "4"]


def test_cli_vanish_json_reports_every_scale():
    result = runner.invoke(app, [*TINY, "--scale", "0.5,2", "--format", "json", "--iters", "50"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["T"] == 6 and data["settings"]["backend"] == "numpy"
    assert [s["radius"] for s in data["scales"]] == [0.5, 2.0]
    for s in data["scales"]:
        p = s["products"]
        assert p["spectral_radius"] == pytest.approx(s["radius"], rel=1e-9)
        assert len(p["norms"]) == 6 and p["norms"][0] == pytest.approx(1.0)
        assert len(s["contributions"]["norms"]) == 6 and len(s["steps"]["total"]) == 6
        assert s["truncation"]["rel_error"][-1] == 0
    assert data["scales"][0]["products"]["decay_rate"] < 1 < data["scales"][1]["products"]["decay_rate"]


def test_cli_vanish_table_has_a_row_per_scale():
    result = runner.invoke(app, [*TINY, "--scale", "0.5,0.9,1.5"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert "horizon" in lines[0] and "rate/step" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["0.5", "0.9", "1.5"]


def test_cli_vanish_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "vanish.png"
    result = runner.invoke(app, [*TINY, "--scale", "0.5,1.5", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert_png_drawn(out, 1540, 990)  # figsize (14, 9) at 110 dpi


def test_cli_vanish_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    out = tmp_path / "v.png"
    result = runner.invoke(app, [*TINY, "--plot", str(out)])
    assert result.exit_code == 2 and "matplotlib" in result.output and not out.exists()


@pytest.mark.parametrize(
    "args,what",
    [
        (["--scale", "0.5,abc"], "--scale"),
        (["--scale", "0.5,-1"], "--scale"),
        (["--threshold", "0"], "--threshold"),
        (["--seq-len", "0"], "--seq-len"),
        (["--plot", "nowhere/at/all.png"], "--plot"),
        (["--plot", "vanish.jpg"], "--plot"),
        (["--format", "xml"], "--format"),
    ],
)
def test_cli_vanish_bad_options_are_usage_errors(args, what):
    result = runner.invoke(app, [*TINY, *args])
    assert result.exit_code == 2 and what in result.output
