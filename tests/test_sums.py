"""Bias gradients summed over every step and example keep float32's accuracy: NumPy's axis-0 sum adds row after
row (an error growing as T·B: 6.5e-6 relative at T·B = 128 000, 20 times torch's); ``NumpyBackend.sum_rows`` sums
blocks of rows, then the blocks."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.backend.numpy_backend import SUM_BLOCK, NumpyBackend


@pytest.mark.parametrize("n", [1, SUM_BLOCK, SUM_BLOCK + 1, 10 * SUM_BLOCK + 7, SUM_BLOCK**2 + 3])
def test_sum_rows_is_the_column_sum_for_any_layout(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 6))
    be = NumpyBackend()
    np.testing.assert_allclose(be.sum_rows(a), a.sum(axis=0), rtol=1e-12, atol=1e-9)
    view = rng.normal(size=(n, 9))[:, ::2]  # strided columns, as the GRU's b_hn third
    out = np.empty(5)
    assert be.sum_rows(view, out=out) is out
    np.testing.assert_allclose(out, view.sum(axis=0), rtol=1e-12, atol=1e-9)


def test_bias_gradients_over_many_steps_keep_float32s_accuracy():
    T, B, H, K = 2000, 64, 16, 6
    rng = np.random.default_rng(0)
    m64 = gpubptt.RNN(4, H, K, backend="numpy", dtype="float64", seed=0, bias=True)
    m32 = gpubptt.RNN.from_params(dict(m64.params), backend="numpy", dtype="float32")
    x, y = rng.integers(0, 4, (T, B)), rng.integers(0, K, (T, B))
    _, g64 = m64.loss_and_grads(x, y)
    _, g32 = m32.loss_and_grads(x, y)
    for name in ("c", "b"):  # row by row: 6.5e-6
        assert np.abs(g32[name] - g64[name]).max() / np.abs(g64[name]).max() < 1e-6, name
