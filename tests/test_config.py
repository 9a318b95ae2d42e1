"""The architecture record (``gpubptt.config.ModelConfig``): a model is built from it and keeps it; sizes are
never read back from parameter shapes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubptt
from gpubptt.config import ModelConfig


def test_a_model_records_its_architecture_and_to_rebuilds_from_it():
    model = gpubptt.RNN(5, 4, 3, cell="gru", num_layers=2, bidirectional=True, bias=True, backend="numpy", seed=0)
    cfg = model.config
    assert (cfg.input_size, cfg.hidden_size, cfg.output_size, cfg.num_layers, cfg.bidirectional, cfg.bias) == (
        5, 4, 3, 2, True, True,
    )  # fmt: skip
    assert cfg.cell == gpubptt.cells.GRUCell() and cfg.dtype == np.float32
    assert list(cfg.param_shapes()) == list(model.params) and cfg.param_shapes()["W_l1_reverse"] == (12, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 5
    copy = model.to("numpy")
    assert copy.config == cfg
    for k in model.params:
        np.testing.assert_array_equal(copy.params[k], model.params[k])


def test_from_params_with_a_config_checks_every_array_against_it():
    model = gpubptt.RNN(5, 4, 3, cell="indrnn", bias=True, backend="numpy", seed=0)
    params = {k: np.asarray(v) for k, v in model.params.items()}
    same = gpubptt.RNN.from_params(params, backend="numpy", config=model.config)
    assert same.config == model.config and same.hidden_size == 4
    with pytest.raises(gpubptt.ShapeError, match=r"parameter w must have shape \(4,\) \(from the config\)"):
        gpubptt.RNN.from_params({**params, "w": np.zeros(5)}, backend="numpy", config=model.config)
    with pytest.raises(gpubptt.InputError, match="exactly the config's parameters"):
        gpubptt.RNN.from_params({k: v for k, v in params.items() if k != "c"}, backend="numpy", config=model.config)
    with pytest.raises(gpubptt.InputError, match="leave cell and nonlinearity unset"):
        gpubptt.RNN.from_params(params, backend="numpy", config=model.config, cell="rnn")
    wider = ModelConfig(5, 4, 3, gpubptt.cells.IndRNNCell("tanh"), bias=True, dtype=np.dtype("float64"))
    assert gpubptt.RNN.from_params(params, backend="numpy", config=wider).nonlinearity == "tanh"


def test_from_params_without_a_cell_reads_it_from_the_weights_given():
    ind = gpubptt.RNN(5, 4, 3, cell="indrnn", bias=True, backend="numpy", seed=0)
    assert gpubptt.RNN.from_params(ind.params, backend="numpy").cell_name == "indrnn"
    gru = gpubptt.RNN(5, 4, 3, cell="gru", backend="numpy", seed=0)
    assert gpubptt.RNN.from_params(gru.params, backend="numpy").cell_name == "gru"
