"""Copies of the objects a user holds beside a model: ``copy.copy`` of a model, ``pickle`` of its parameters, an
optimizer copied or pickled with its model or alone, and the distributed wrappers (refused with a clear error)."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import gpubptt
from gpubptt.distributed import LocalCommunicator
from gpubptt.distributed.parallel import DataParallel, ShardedData
from gpubptt.errors import InputTypeError
from gpubptt.training.optim import make_optimizer

X = np.array([[0, 1], [2, 0], [1, 1]], dtype=np.int64)


def test_a_shallow_copy_of_a_model_draws_its_own_dropout_masks():
    model = gpubptt.RNN(3, 5, 3, cell="gru", num_layers=2, dropout=0.5, backend="numpy", seed=0)
    shallow, twin = copy.copy(model), copy.deepcopy(model)  # the same generator state, each its own
    model.loss_and_grads(X, X)  # the original draws masks: the copies' next draws stay as they were
    assert float(shallow.loss_and_grads(X, X)[0]) == float(twin.loss_and_grads(X, X)[0])
    assert shallow.params["W_l1"] is not model.params["W_l1"]


def test_parameters_pickle_into_a_plain_dict_of_equal_arrays():
    model = gpubptt.RNN(3, 5, 3, cell="lstm", backend="numpy", seed=0)
    back = pickle.loads(pickle.dumps(model.params))
    assert type(back) is dict and set(back) == set(model.params)
    for k, v in back.items():
        np.testing.assert_array_equal(v, model.params[k])
        assert v is not model.params[k]


def _step(model, opt):
    loss, grads = model.loss_and_grads(X, X)
    opt.step(grads, loss=loss)


@pytest.mark.parametrize("cell", ["indrnn", "lstm"])
@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda pair: pickle.loads(pickle.dumps(pair)), lambda pair: copy.deepcopy(pair[::-1])[::-1]],
    ids=["deepcopy", "pickle", "optimizer-first"],
)
def test_an_optimizer_copied_with_its_model_steps_the_copied_model(cell, clone):
    model = gpubptt.RNN(3, 5, 3, cell=cell, backend="numpy", seed=0)
    opt = make_optimizer("adam", model, lr=0.05)
    _step(model, opt)  # Adam's moments and step count are not zero
    model2, opt2 = clone((model, opt))
    assert opt2.params is model2.params and opt2.t == opt.t
    before = {k: v.copy() for k, v in model.params.items()}
    _step(model2, opt2)
    _step(model, opt)  # the original, one step on: where the copy must be
    for k in model.params:
        np.testing.assert_array_equal(model2.params[k], model.params[k])
        assert not np.array_equal(model.params[k], before[k]) or k == "c"


def test_an_optimizer_copied_alone_brings_its_own_model_and_leaves_the_original():
    model = gpubptt.RNN(3, 5, 3, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model, lr=0.5, momentum=0.9)
    _step(model, opt)
    opt2 = copy.deepcopy(opt)
    assert opt2.params is not model.params
    before = {k: v.copy() for k, v in model.params.items()}
    opt2.step({k: np.ones_like(v) for k, v in model.params.items()})
    for k in model.params:
        np.testing.assert_array_equal(model.params[k], before[k])
        assert not np.array_equal(opt2.params[k], before[k])


def test_an_optimizer_on_a_mapping_pickles_with_its_state():
    opt = make_optimizer("sgd", {"w": np.ones(3)}, lr=0.1, momentum=0.9)
    opt.step({"w": np.ones(3)})
    back = pickle.loads(pickle.dumps(opt))
    assert back.t == 1 and type(back.params) is dict
    np.testing.assert_array_equal(back.state["momentum"]["w"], opt.state["momentum"]["w"])
    back.step({"w": np.ones(3)}), opt.step({"w": np.ones(3)})
    np.testing.assert_array_equal(back.params["w"], opt.params["w"])


class _Data:
    vocab_size = 3

    def check_batch(self, batch_size: int, chunk: int) -> None:
        pass


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_the_distributed_wrappers_refuse_copies_naming_what_to_copy(how):
    dp = DataParallel(gpubptt.RNN(3, 5, 3, backend="numpy", seed=0), LocalCommunicator(), batch_size=2)
    data = ShardedData(_Data(), batch_size=2, lo=0, hi=2, comm=LocalCommunicator())
    for wrapper, inner in ((dp, ".model"), (data, ".data")):
        with pytest.raises(InputTypeError, match=f"cannot be copied or pickled.*{inner}"):
            how(wrapper)
    assert dp.hidden_size == 5 and data.vocab_size == 3  # what they wrap still answers through them
