"""The output layer's softmax and cross-entropy over a chunk's logits in two halves of the rows at once
(``NumpyBackend.row_blocks``), forced on at a small shape: loss and gradients as the float64 reference's."""

from __future__ import annotations

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
