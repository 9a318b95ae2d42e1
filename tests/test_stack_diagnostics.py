"""Diagnostics of stacks against independent references: the Jacobians through the stack and the per-layer
step gradients by central differences of a plain forward loop, and the top layer's product norms two ways."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.diagnostics.stack import stack_report, stack_sweep, with_radius
from tests.reference import phi, stack_name

D, H, K, T, B, L = 5, 4, 5, 7, 2, 3


def forward_with_bumps(p, x, nonlinearity, bumps):
    """States s[l][t] (H,) of one example (x (T,) ids), adding bumps[(l, t)] to s^l_t right after it is made."""
    s = [[None] * T for _ in range(L)]
    for t in range(T):
        inp = None
        for layer in range(L):
            U, W = p[stack_name("U", layer, 0)], p[stack_name("W", layer, 0)]
            prev = s[layer][t - 1] if t else np.zeros(H)
            ux = U[:, x[t]] if inp is None else U @ inp
            s[layer][t] = phi(ux + W @ prev + p.get(stack_name("b", layer, 0), 0.0), nonlinearity) + bumps.get(
                (layer, t), 0.0
            )
            inp = s[layer][t]
    return s


def loss_of(p, x, y, s_top):
    total = 0.0
    for t in range(T):
        z = p["V"] @ s_top[t] + p.get("c", 0.0)
        z = z - z.max()
        total -= z[y[t]] - np.log(np.exp(z).sum())
    return total


@pytest.fixture(params=["tanh", "relu"])
def setup(request):
    model = gpubptt.RNN(D, H, K, num_layers=L, nonlinearity=request.param, backend="numpy", dtype="float64",
                        bias=True, init="torch", seed=3)  # fmt: skip
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    return model, {k: np.array(v) for k, v in model.params.items()}, x, y, request.param


def test_jacobians_through_the_stack_match_central_differences(setup):
    model, p, x, y, nonlinearity = setup
    report = stack_report(model, x, y)
    eps, end = 1e-6, T - 1
    for layer in range(L):
        for lag in (0, 1, 3, end):
            k = end - lag
            logs = []
            for b in range(B):
                J = np.empty((H, H))
                for i in range(H):
                    e = np.zeros(H)
                    e[i] = eps
                    up = forward_with_bumps(p, x[:, b], nonlinearity, {(layer, k): e})[L - 1][end]
                    down = forward_with_bumps(p, x[:, b], nonlinearity, {(layer, k): -e})[L - 1][end]
                    J[:, i] = (up - down) / (2 * eps)
                logs.append(np.log(np.linalg.norm(J, 2)))
            got = report.through_stack.per_layer[layer].norms[lag]
            np.testing.assert_allclose(got, np.exp(np.mean(logs)), rtol=1e-6, err_msg=f"layer {layer} lag {lag}")


def test_per_layer_step_gradients_match_central_differences(setup):
    model, p, x, y, nonlinearity = setup
    report = stack_report(model, x, y)
    eps = 1e-6
    for layer in range(L):
        want = np.zeros(T)
        for t in range(T):
            g = np.zeros((B, H))
            for b in range(B):
                for i in range(H):
                    e = np.zeros(H)
                    e[i] = eps
                    up = loss_of(p, x[:, b], y[:, b], forward_with_bumps(p, x[:, b], nonlinearity, {(layer, t): e})[-1])
                    down = loss_of(
                        p, x[:, b], y[:, b], forward_with_bumps(p, x[:, b], nonlinearity, {(layer, t): -e})[-1]
                    )
                    g[b, i] = (up - down) / (2 * eps)
            want[t] = np.linalg.norm(g)
        np.testing.assert_allclose(report.recurrences[layer].step_gradients, want, rtol=1e-6, atol=1e-9)


def test_the_top_layers_own_products_are_its_jacobians_through_the_stack(setup):
    model, _, x, y, _ = setup
    report = stack_report(model, x, y, iters=2000, tol=1e-12)  # power iteration against dense SVDs
    own = report.recurrences[-1].own.norms
    np.testing.assert_allclose(own, report.through_stack.per_layer[-1].norms, rtol=1e-6)


def test_bidirectional_stacks_report_each_recurrence_in_its_own_time():
    model = gpubptt.RNN(D, H, K, num_layers=2, bidirectional=True, backend="numpy", dtype="float64", seed=1)
    x = np.random.default_rng(1).integers(0, D, (T, B))
    report = stack_report(model, x, x % K)
    assert [r.name for r in report.recurrences] == ["", "_reverse", "_l1", "_l1_reverse"]
    assert report.through_stack is None and report.recurrences[0].step_gradients is None
    _, grads = model.loss_and_grads(x, x % K)
    for r, rec in zip(report.recurrences, model.recurrences, strict=True):
        np.testing.assert_allclose(r.grad_s0, np.linalg.norm(grads["s0"][rec.index]))


def test_rescaling_sets_every_recurrences_spectral_radius():
    model = gpubptt.RNN(D, H, K, num_layers=2, bidirectional=True, backend="numpy", dtype="float64", seed=2)
    x = np.random.default_rng(2).integers(0, D, (T, B))
    sweep = stack_sweep(model, x, x % K, [0.5, None])
    assert [r for r, _ in sweep] == [0.5, None]
    for r in sweep[0][1].recurrences:
        assert abs(r.spectral_radius - 0.5) < 1e-12
    assert with_radius(model, 2.0).num_states == 4


def test_the_stack_report_of_a_model_with_dropout_is_that_of_its_weights_without_it():
    from gpubptt.diagnostics.stack import stack_report

    model = gpubptt.RNN(4, 5, 4, num_layers=2, dropout=0.5, dtype="float64", seed=0, backend="numpy")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (6, 3)), rng.integers(0, 4, (6, 3))
    plain = gpubptt.RNN.from_params(model.params, backend="numpy", config=model.config)  # no dropout
    want = [r.grad_s0 for r in stack_report(plain, x, y).recurrences]
    for _ in range(2):  # the same every call: no masks drawn behind the states it measures
        assert [r.grad_s0 for r in stack_report(model, x, y).recurrences] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("precision", "step_kernels"), [("bf16", None), ("fp32", "cublas")])
def test_the_stack_report_computes_its_states_with_the_models_own_step_kernels(precision, step_kernels):
    # it ran "auto" whatever the model said: under bf16 (cuBLAS GEMMs per step) it ran the float32 persistent kernel,
    # states that were not the model's, and it ignored a model's own step_kernels
    from tests.test_elman_kernels import _Compiling

    be = _Compiling()
    rng = np.random.default_rng(0)
    T, B, D, H, K = 6, 3, 4, 5, 6
    model = gpubptt.RNN(D, H, K, backend=be.with_precision(precision), seed=1, dtype="float32")
    model.step_kernels = step_kernels
    x, y = rng.normal(size=(T, B, D)).astype(np.float32), rng.integers(0, K, size=(T, B))
    be.log.clear()
    model.loss_and_grads(x, y)
    assert be.log == []  # what the model itself runs: cuBLAS GEMMs, no step kernel
    stack_report(model, x, y)
    assert be.log == []
