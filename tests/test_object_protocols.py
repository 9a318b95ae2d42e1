"""What Python users do with gpubptt's objects beyond their methods: set an attribute, update a mapping, compare two
results. Each test failed before its fix: a model whose architecture was set by hand saved a checkpoint that
loading refuses (over a good one) and failed its next call with NumPy's errors; ``params.update`` applied the entries
before a refused one; comparing parameter mappings or results raised NumPy's ambiguity error."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import gpubptt
from gpubptt.training.record import load_checkpoint, save_checkpoint

X = np.array([[0, 1], [2, 0], [1, 1]], dtype=np.int64)


def _model(**kw) -> gpubptt.RNN:
    return gpubptt.RNN(3, 4, 3, backend="numpy", seed=0, **kw)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_layers", 2),
        ("bidirectional", True),
        ("dtype", np.dtype("float64")),
        ("cell", gpubptt.cells.make_cell("gru")),
        ("config", None),  # replaced below by another architecture's config
        ("recurrences", ()),
    ],
)
def test_the_architecture_cannot_be_set_so_a_saved_file_always_loads(tmp_path, name, value):
    model = _model()
    good = tmp_path / "ck.npz"
    save_checkpoint(good, model)
    if name == "config":
        value = dataclasses.replace(model.config, bias=False)
    loss = float(model.loss(X, X))
    with pytest.raises(AttributeError, match=f"{name} is part of the model's architecture"):
        setattr(model, name, value)
    save_checkpoint(good, model)  # the same architecture as ever: the file still loads, and so does the model
    loaded = load_checkpoint(good, backend="numpy").model
    assert float(loaded.loss(X, X)) == loss == float(model.loss(X, X))
    assert model.recurrences == tuple(model.config.recurrences)


def test_a_model_pickled_while_its_architecture_was_plain_attributes_still_loads():
    model = _model(num_layers=2, bidirectional=True)
    state = model.__getstate__()
    config = state.pop("_config")
    state.pop("_recurrences")
    state.update(config=config, dtype=config.dtype, cell=config.cell, num_layers=2, bidirectional=True,
                 recurrences=list(config.recurrences))  # fmt: skip
    old = gpubptt.RNN.__new__(gpubptt.RNN)
    old.__setstate__(state)
    assert old.config == model.config and old.recurrences == model.recurrences
    assert float(old.loss(X, X)) == float(model.loss(X, X))
    assert float(pickle.loads(pickle.dumps(old)).loss(X, X)) == float(model.loss(X, X))


def test_params_update_checks_every_entry_before_it_changes_any():
    model = _model()
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(gpubptt.ShapeError, match=r"parameter V must have shape \(3, 4\), got \(4, 4\)"):
        model.params.update({"W": np.eye(4), "V": np.eye(4)})
    assert all(np.array_equal(v, before[k]) for k, v in model.params.items())
    with pytest.raises(gpubptt.InputError, match="unknown parameter 'Q'"):
        model.params.update(W=np.eye(4), Q=np.eye(4))
    assert np.array_equal(model.params["W"], before["W"])
    model.params.update({"W": np.eye(4)}, V=np.ones((3, 4)))  # every entry valid: all applied, as dict.update does
    assert np.array_equal(model.params["W"], np.eye(4)) and np.array_equal(model.params["V"], np.ones((3, 4)))


def test_parameters_given_with_a_key_that_is_not_a_name_are_refused_by_name():
    model = _model()
    with pytest.raises(gpubptt.InputError, match="parameters must be given as a mapping with exactly"):
        model.params = {**model.params.copy(), 1: np.zeros(2)}


def test_parameter_mappings_compare_by_names_and_values_and_results_by_identity():
    model = _model()
    twin = copy.deepcopy(model)
    assert model.params == twin.params and model.params == dict(twin.params.copy())
    twin.params["W"] = twin.params["W"] + 1
    assert model.params != twin.params and model.params != {"W": model.params["W"]} and model.params != 3
    out = model.forward(X)
    assert out == out and out != model.forward(X)  # results: the same object or not (their arrays are the caller's)


def test_text_streams_are_the_callers_even_for_one_stream():
    """B = 1 returned views of the data set's ids: writing into x changed every later batch."""
    from gpubptt.training.data import TextData

    data = TextData("the quick brown fox jumps over the lazy dog " * 6)
    ids = data.train_ids.copy()
    for B in (1, 2):
        x, y = data.train_sequence(0, seed=0, batch_size=B, chunk=4)
        assert not np.shares_memory(x, data.train_ids) and not np.shares_memory(x, y)
        x[:] = 0
        y[:] = 0
        assert np.array_equal(data.train_ids, ids)
    for x, y in data.eval_sequences():
        assert not np.shares_memory(x, data.val_ids) and not np.shares_memory(y, data.val_ids)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("steps", "3", "steps must be an int ≥ 1, got '3'"), ("seed", -1, "seed must be an int ≥ 0"),
     ("steps", 2.5, "steps must be an int ≥ 1, got 2.5")],
)  # fmt: skip
def test_a_train_config_field_set_after_construction_is_checked_when_training_starts(field, value, words):
    from gpubptt.training.data import TextData
    from gpubptt.training.loop import TrainConfig, train
    from gpubptt.training.optim import make_optimizer

    data = TextData("abcdefgh" * 20)
    model = gpubptt.RNN(data.input_size, 4, data.output_size, backend="numpy", seed=0)
    opt = make_optimizer("sgd", model)
    config = TrainConfig(steps=2, batch_size=2, chunk=4, eval_every=0)
    setattr(config, field, value)
    before = {k: v.copy() for k, v in model.params.items()}
    with pytest.raises(gpubptt.InputError, match=words):
        train(model, data, opt, config)
    assert opt.t == 0 and all(np.array_equal(v, before[k]) for k, v in model.params.items())


def test_a_cell_is_fixed_once_built_so_a_model_runs_what_its_config_says():
    """``m.cell.nonlinearity = "sigmoid"`` was accepted: the model ran tanh, its save failed; "relu" ran relu while
    ``config`` and copies (sharing the cell) said tanh; an IndRNN's ``max_weight = -1`` flipped its weights."""
    from gpubptt.cells import make_cell

    model = _model()
    with pytest.raises(AttributeError, match=r"a cell is fixed once built .*'nonlinearity'"):
        model.cell.nonlinearity = "relu"
    ind = gpubptt.RNN(3, 5, 4, cell="indrnn", init="torch", seed=0, backend="numpy")
    with pytest.raises(AttributeError, match="'max_weight'"):
        ind.cell.max_weight = -1.0
    with pytest.raises(AttributeError, match="tried to delete 'nonlinearity'"):
        del model.cell.nonlinearity
    cell = make_cell("rnn", nonlinearity="relu")
    assert {cell: 1}[make_cell("rnn", nonlinearity="relu")] == 1  # a dict key that stays what it was
    assert copy.deepcopy(cell) == cell and pickle.loads(pickle.dumps(cell)) == cell
    assert model.cell.nonlinearity == model.config.cell.nonlinearity == "tanh"
