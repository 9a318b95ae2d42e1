"""The output layer's softmax and cross-entropy over a chunk's logits in two halves of the rows at once
(``NumpyBackend.row_blocks``), forced on at a small shape: loss and gradients as the float64 reference's."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import numpy_backend
from tests.reference import numeric, ref_loss


@pytest.mark.parametrize("chunk_elements", [None, 2 * 3 * 6])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_softmax_xent_in_row_halves_matches_the_reference(chunk_elements, reduction, monkeypatch):
    """Biases, ragged lengths (weighted rows), chunks of 2 steps or one chunk; the loss alone (``loss``) too."""
    monkeypatch.setattr(numpy_backend, "ROW_SPLIT_MIN_ELEMENTS", 1)
    be = numpy_backend.NumpyBackend()
    be.blas_threads.most = max(2, be.blas_threads.most)
    blocks = []
    row_blocks = be.row_blocks
    monkeypatch.setattr(be, "row_blocks", lambda n, e: blocks.append(row_blocks(n, e)) or blocks[-1])
    T, B, D, H, K = 5, 3, 4, 3, 6
    model = gpubptt.RNN(D, H, K, bias=True, backend=be, dtype="float64", seed=4, init="torch")
    model.chunk_elements = chunk_elements  # None: one chunk; 2·B·K: chunks of two steps
    rng = np.random.default_rng(4)
    x, y, lengths = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B)), np.array([5, 2, 4])
    loss, grads = model.loss_and_grads(x, y, lengths=lengths, reduction=reduction)
    assert blocks and all(len(b) == 2 for b in blocks)  # every chunk in two halves of its rows
    p = {k: np.array(v) for k, v in model.params.items()}
    f = lambda: ref_loss(p, x, y, lengths=lengths, reduction=reduction)  # noqa: E731
    assert loss == pytest.approx(f(), rel=1e-12)
    assert model.loss(x, y, lengths=lengths, reduction=reduction) == pytest.approx(f(), rel=1e-12)
    for name in ("V", "c", "W", "U"):
        idx = rng.choice(p[name].size, min(p[name].size, 6), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, p[name], idx), rtol=1e-6, atol=1e-9,
                                   err_msg=name)  # fmt: skip


def test_row_blocks_are_one_block_for_small_work_one_core_or_inside_a_job(monkeypatch):
    be = numpy_backend.NumpyBackend()
    be.blas_threads.most = 2
    big = numpy_backend.ROW_SPLIT_MIN_ELEMENTS
    assert be.row_blocks(7, big) == [slice(0, 4), slice(4, 7)]
    assert be.row_blocks(7, big - 1) == [slice(0, 7)]
    assert be.row_blocks(1, big) == [slice(0, 1)]
    with be.blas_threads.inside_job():  # a bidirectional layer's job: the jobs are the parallelism
        assert be.row_blocks(7, big) == [slice(0, 7)]
    be.blas_threads.most = 1
    assert be.row_blocks(7, big) == [slice(0, 7)]


def test_jobs_run_under_the_callers_numpy_error_settings(monkeypatch):
    """A row half in the pool's thread follows the caller's np.errstate, as the half in the caller's own does:
    infinite logits (V = inf) raise under errstate(invalid="raise") and stay quiet under "ignore"."""
    monkeypatch.setattr(numpy_backend, "ROW_SPLIT_MIN_ELEMENTS", 1)
    be = numpy_backend.NumpyBackend()
    be.blas_threads.most = max(2, be.blas_threads.most)
    seen = []
    with np.errstate(divide="raise", invalid="ignore"):
        be.run_concurrently([lambda: seen.append(np.geterr()) for _ in range(2)])
    assert [(s["divide"], s["invalid"]) for s in seen] == [("raise", "ignore")] * 2
    model = gpubptt.RNN(3, 4, 5, bias=False, backend=be, dtype="float64", seed=1)
    model.params["V"][...] = np.inf
    x, y = np.random.default_rng(1).normal(size=(4, 6, 3)), np.zeros((4, 6), dtype=int)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning from either half fails
        loss, _ = model.loss_and_grads(x, y)
    assert not np.isfinite(loss)
    with np.errstate(all="ignore", invalid="raise"), pytest.raises(FloatingPointError):
        model.loss_and_grads(x, y)


def test_recomputed_segments_with_row_halves_match_the_reference(monkeypatch):
    """Recomputation sums the output layer's gradients over segments (``accumulate``); with row halves forced."""
    monkeypatch.setattr(numpy_backend, "ROW_SPLIT_MIN_ELEMENTS", 1)
    be = numpy_backend.NumpyBackend()
    be.blas_threads.most = max(2, be.blas_threads.most)
    T, B, D, H, K = 6, 3, 4, 3, 5
    model = gpubptt.RNN(D, H, K, bias=True, backend=be, dtype="float64", seed=6, init="torch")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    loss, grads = model.loss_and_grads(x, y, recompute=2)
    p = {k: np.array(v) for k, v in model.params.items()}
    f = lambda: ref_loss(p, x, y)  # noqa: E731
    assert loss == pytest.approx(f(), rel=1e-12)
    for name in ("V", "c", "W"):
        idx = rng.choice(p[name].size, min(p[name].size, 6), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, p[name], idx), rtol=1e-6, atol=1e-9,
                                   err_msg=name)  # fmt: skip
