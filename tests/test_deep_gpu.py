"""Deep and bidirectional models on CuPy against NumPy float64 (gpu marker; skipped with the reason
without a CUDA device): graphs, fused and persistent step kernels, lengths, truncation, dropout, the
stack diagnostics and a float32 run against the float64 reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt
from gpubptt.diagnostics import stack_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(
    "layers,bidirectional,nonlinearity", list(itertools.product([2, 3], [False, True], ["tanh", "relu"]))
)
@pytest.mark.parametrize("step_kernels", ["auto", "cublas", "fused", "persistent"])
def test_cupy_stacks_match_numpy_float64(cupy_be, layers, bidirectional, nonlinearity, step_kernels):
    rng = np.random.default_rng(layers)
    ref = gpubptt.RNN(20, 32, 15, num_layers=layers, bidirectional=bidirectional, nonlinearity=nonlinearity,
                      backend="numpy", dtype="float64", bias=True, seed=4, init="torch")  # fmt: skip
    gpu = ref.to(cupy_be)
    gpu.step_kernels = step_kernels
    for tokens in (True, False):
        x = rng.integers(0, 20, size=(12, 6)) if tokens else rng.normal(size=(12, 6, 20))
        y = rng.integers(0, 15, size=(12, 6))
        s0 = rng.normal(size=(ref.num_states, 6, 32)) * 0.2
        lengths = np.array([12, 5, 0, 1, 12, 7])
        for truncate in (None, 3):
            for _ in range(2):  # the second call replays the captured graph
                l1, g1, f1 = ref.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate, return_final_state=True)
                l2, g2, f2 = gpu.loss_and_grads(
                    cupy_be.asarray(x), cupy_be.asarray(y), cupy_be.asarray(s0), lengths=cupy_be.asarray(lengths),
                    truncate=truncate, return_final_state=True,
                )  # fmt: skip
                assert float(l2) == pytest.approx(float(l1), rel=1e-12)
                for k in g1:
                    np.testing.assert_allclose(gpubptt.to_numpy(g2[k]), g1[k], rtol=1e-10, atol=1e-12, err_msg=k)
                np.testing.assert_allclose(gpubptt.to_numpy(f2), f1, rtol=1e-12, atol=1e-14)
        out1, out2 = ref.forward(x, s0, lengths=lengths), gpu.forward(cupy_be.asarray(x), cupy_be.asarray(s0),
                                                                        lengths=cupy_be.asarray(lengths))  # fmt: skip
        np.testing.assert_allclose(gpubptt.to_numpy(out2.probs), out1.probs, rtol=1e-12, atol=1e-14)


def test_cupy_float32_stack_matches_the_float64_reference(cupy_be):
    rng = np.random.default_rng(7)
    ref = gpubptt.RNN(50, 64, 40, num_layers=2, bidirectional=True, backend="numpy", dtype="float64", seed=5)
    gpu = gpubptt.RNN.from_params(ref.params, backend=cupy_be, dtype="float32")
    x, y = rng.integers(0, 50, size=(30, 16)), rng.integers(0, 40, size=(30, 16))
    l1, g1 = ref.loss_and_grads(x, y)
    l2, g2 = gpu.loss_and_grads(cupy_be.asarray(x), cupy_be.asarray(y))
    assert float(l2) == pytest.approx(float(l1), rel=1e-5)
    for k in g1:
        g = gpubptt.to_numpy(g2[k])
        assert np.abs(g - g1[k]).max() <= 1e-4 * max(np.abs(g1[k]).max(), 1e-3), k


def test_cupy_dropout_is_seeded_on_the_device_and_exact_for_its_masks(cupy_be):
    model = gpubptt.RNN(8, 16, 8, num_layers=3, dropout=0.3, backend=cupy_be, dtype="float64", seed=1, bias=True)
    x = cupy_be.asarray(np.random.default_rng(2).integers(0, 8, size=(9, 4)))
    a = model.loss_and_grads(x, x, dropout_seed=5)
    b = model.loss_and_grads(x, x, dropout_seed=5)
    np.testing.assert_array_equal(gpubptt.to_numpy(a[1]["W_l1"]), gpubptt.to_numpy(b[1]["W_l1"]))
    assert float(a[0]) == pytest.approx(float(model.loss(x, x, dropout_seed=5)), rel=1e-12)
    assert float(a[0]) != pytest.approx(float(model.loss(x, x)), rel=1e-6)  # forward-only: no dropout
    report = gpubptt.gradcheck(model, x, x, max_coords=10, dropout_seed=5)
    assert max(report.errors.values()) < 1e-5, report  # another mask for the numeric side: errors of order 1


def test_cupy_stack_diagnostics_match_numpy(cupy_be):
    ref = gpubptt.RNN(8, 6, 8, num_layers=3, backend="numpy", dtype="float64", seed=3, init="torch")
    x = np.random.default_rng(3).integers(0, 8, size=(9, 3))
    a = stack_report(ref, x, x, iters=500, tol=1e-12)
    b = stack_report(ref.to(cupy_be), cupy_be.asarray(x), cupy_be.asarray(x), iters=500, tol=1e-12)
    for ra, rb in zip(a.recurrences, b.recurrences, strict=True):
        np.testing.assert_allclose(rb.step_gradients, ra.step_gradients, rtol=1e-10)
        np.testing.assert_allclose(rb.own.norms, ra.own.norms, rtol=1e-6)
    for da, db in zip(a.through_stack.per_layer, b.through_stack.per_layer, strict=True):
        np.testing.assert_allclose(db.norms, da.norms, rtol=1e-10)
