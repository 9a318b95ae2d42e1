"""``states`` under ``batch_first``, the call-time flags checked as the constructor's are, and ``from_torch``'s
messages naming the module of the cell asked for."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import gpubptt
from gpubptt.errors import InputError, InputTypeError

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    "cell, layers, bi", [("rnn", 1, False), ("lstm", 2, False), ("gru", 1, True)], ids=["rnn", "lstm-2", "gru-bi"]
)
def test_states_read_and_return_the_batch_first(cell, layers, bi):
    model = gpubptt.RNN(3, 4, 3, cell=cell, num_layers=layers, bidirectional=bi, backend="numpy", dtype="float64")
    x = RNG.standard_normal((5, 2, 3))  # T = 5, B = 2
    time_major = model.states(x)
    model.batch_first = True
    batch_first = model.states(np.ascontiguousarray(x.swapaxes(0, 1)))
    np.testing.assert_array_equal(batch_first, time_major.swapaxes(-3, -2))  # (…, B, T+1, H)
    assert batch_first.shape[-3:] == (2, 6, 4)


def test_the_call_flags_must_be_bools():
    model = gpubptt.RNN(4, 3, 4, backend="numpy", dtype="float64", seed=0)
    x = np.zeros((5, 2), np.int64)
    with pytest.raises(InputTypeError, match="return_final_state must be a bool, got str 'no'"):
        model.loss_and_grads(x, x, return_final_state="no")
    with pytest.raises(InputTypeError, match="batch_first must be a bool, got str 'False'"):
        model.batch_first = "False"
    assert model.batch_first is False  # the refused value did not land
    out, pullback = model.vjp(RNG.standard_normal((5, 2, 4)))
    with pytest.raises(InputTypeError, match="want_dx must be a bool"):
        pullback(np.ones_like(out.states), want_dx="no")
    grads = pullback(np.ones_like(out.states), want_dx=np.bool_(False))  # the refusal spent nothing
    assert "x" not in grads and "W" in grads


def test_a_model_pickled_before_batch_first_was_checked_loads_with_it():
    model = gpubptt.RNN(4, 3, 4, backend="numpy", seed=0)
    state = model.__getstate__()
    state["batch_first"] = state.pop("_batch_first")  # as pickled before: a plain attribute
    old = type(model).__new__(type(model))
    old.__setstate__(state)
    assert old.batch_first is False and pickle.loads(pickle.dumps(old)).batch_first is False


@pytest.mark.parametrize("cell, module", [("gru", "nn.GRU"), ("lstm", "nn.LSTM")])
def test_from_torch_names_the_module_of_the_cell(cell, module):
    model = gpubptt.RNN(3, 4, 3, cell=cell, backend="numpy", seed=0)
    rnn_sd, lin_sd = model.to_torch()
    del rnn_sd["weight_ih_l0"]
    with pytest.raises(InputError, match=f"the {module} state dict is missing 'weight_ih_l0'"):
        gpubptt.RNN.from_torch(rnn_sd, lin_sd, cell=cell, backend="numpy")
