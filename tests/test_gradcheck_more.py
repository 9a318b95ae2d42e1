"""gradcheck checks the model it is given: its cell's options, and its s0 refused in the model's own words."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.cells import Cell, register_cell
from tests.test_toy_cell import LeakyCell


@register_cell
class _HalfBackward(LeakyCell):
    """The toy cell with a backward that wrongly takes λ = 1/2 whatever the option says."""

    option = "gradcheck-half"
    from_options = Cell.__dict__["from_options"]

    def run_backward(self, G, p, S, aux, **kw):
        return LeakyCell(0.5).run_backward(G, p, S, aux, **kw)  # a built cell is fixed: another one's backward


def test_gradcheck_keeps_the_cells_options_and_catches_a_backward_that_ignores_them():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, (5, 2)), rng.integers(0, 4, (5, 2))
    right = gpubptt.RNN(3, 4, 4, cell=LeakyCell(0.9), backend="numpy", dtype="float64", seed=0)
    assert gpubptt.gradcheck(right, x, y).max_rel_error < 1e-6
    wrong = gpubptt.RNN(3, 4, 4, cell=_HalfBackward(0.9), backend="numpy", dtype="float64", seed=0)
    assert gpubptt.gradcheck(wrong, x, y).errors["U"] > 1e-2  # the copy was rebuilt with λ = 1/2: it passed
    half = gpubptt.RNN(3, 4, 4, cell=_HalfBackward(0.5), backend="numpy", dtype="float64", seed=0)
    assert gpubptt.gradcheck(half, x, y).max_rel_error < 1e-6  # where the shortcut happens to hold


def test_gradcheck_refuses_a_bad_s0_as_the_model_does():
    model = gpubptt.RNN(3, 3, 3, cell="lstm", backend="numpy", dtype="float64", seed=0)
    x = np.zeros((4, 3), np.int64)
    h0 = np.zeros((3, 3))
    for s0 in ([h0, h0], (h0, None)):
        with pytest.raises(Exception) as want:
            model.loss_and_grads(x, x, s0)
        with pytest.raises(type(want.value)) as got:
            gpubptt.gradcheck(model, x, x, s0)
        assert str(got.value) == str(want.value)
