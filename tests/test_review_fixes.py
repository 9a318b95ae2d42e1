"""Defects found by reviewing the merged work, each pinned by a test that failed before its fix.

- an optimizer step whose new *state* overflows (Adagrad's Σg²) while the parameters stay finite
  must be refused like any overflow, or every later save fails on the infinite state;
- an optimizer built on an IndRNN model with ``max_weight`` keeps |w| within the bound (the cell's
  constraint runs after every applied step, not only inside ``gpubptt.training.loop``);
- ``loss(head=...)`` of a model with dropout computes the loss without dropout (as ``loss`` always
  does without a dropout_seed) instead of refusing;
- ``forward`` of an empty sequence (T = 0) under any head returns, instead of crashing.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gpubptt
from gpubptt.training.optim import Adagrad, NonFiniteError, make_optimizer


def test_an_update_that_overflows_the_optimizer_state_is_refused_and_changes_nothing():
    model = gpubptt.RNN(2, 3, 2, backend="numpy", seed=0, bias=False)
    opt = Adagrad(model, lr=1e-3, on_nonfinite="raise")
    big = np.finfo(np.float32).max * 0.999
    for slot in opt.state.values():
        for k in slot:
            slot[k][...] = big  # Σg² at float32's limit: one more g² overflows it
    before = {k: v.copy() for k, v in model.params.items()}
    state = {k: v.copy() for k, v in opt.state["sum_sq"].items()}
    grads = {k: np.full_like(v, 1e18) for k, v in model.params.items()}  # finite, and so is their norm
    with pytest.raises(NonFiniteError, match="optimizer state"):
        opt.step(grads)
    assert opt.t == 0
    for k in before:
        np.testing.assert_array_equal(model.params[k], before[k])
        np.testing.assert_array_equal(opt.state["sum_sq"][k], state[k])
    res = Adagrad(model, lr=1e-3, on_nonfinite="skip")
    for k in res.state["sum_sq"]:
        res.state["sum_sq"][k][...] = big
    out = res.step(grads)
    assert not out.applied and all(name.startswith("updated.") for name in out.nonfinite)


def test_an_optimizer_built_on_a_constrained_indrnn_keeps_w_within_its_bound():
    model = gpubptt.RNN(3, 5, 3, cell="indrnn", backend="numpy", seed=0)
    model = gpubptt.RNN.from_params(model.params, backend="numpy", cell=type(model.cell)(max_weight=0.5))
    opt = make_optimizer("sgd", model, lr=10.0)
    x = np.random.default_rng(0).integers(0, 3, size=(6, 2))
    for _ in range(3):
        _, grads = model.loss_and_grads(x, x)
        grads = {k: -np.sign(g) for k, g in grads.items() if k in model.params}  # push every w outwards
        assert opt.step(grads).applied
    w = np.abs(model.params["w"])
    assert w.max() <= 0.5 and np.isclose(w.max(), 0.5)  # clipped to the bound, not merely small


def test_loss_under_another_head_ignores_dropout_as_loss_always_does():
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(3, 4, 2, num_layers=2, dropout=0.3, backend="numpy", dtype="float64", seed=0)
    plain = gpubptt.RNN.from_params(model.params, backend="numpy")  # the same weights, no dropout at all
    x, y = rng.normal(size=(5, 3, 3)), rng.normal(size=(5, 3, 2))
    assert float(model.loss(x, y, head="mse")) == pytest.approx(float(plain.loss(x, y, head="mse")), rel=1e-14)
    with pytest.raises(gpubptt.InputError, match="dropout"):  # asked for masks it cannot apply: refused
        model.loss(x, y, head="mse", dropout_seed=1)


@pytest.mark.parametrize("head", ["softmax", "last_softmax", "mse", "last_mse"])
def test_forward_of_an_empty_sequence_returns_under_every_head(head):
    model = gpubptt.RNN(3, 4, 2, backend="numpy", seed=0)
    out = model.forward(np.zeros((0, 2, 3), np.float32), head=head)
    assert out.states.shape == (0, 2, 4)


def test_a_run_whose_best_file_cannot_be_written_changes_neither_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gpubptt import _io
    from gpubptt.cli import app
    from gpubptt.training.record import load_checkpoint

    runner, ck, best = CliRunner(), tmp_path / "ck.npz", tmp_path / "ck.best.npz"
    (tmp_path / "book.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["train", "--hidden", "8", "--batch", "2", "--chunk", "8", "--backend", "numpy", "--data"]
    args += [str(tmp_path / "book.txt"), "--steps", "4", "--eval-every", "2", "--checkpoint", str(ck)]
    assert runner.invoke(app, args).exit_code == 0 and best.exists()
    before = {p: p.read_bytes() for p in (ck, best)}
    real = _io._stage

    def stage(path, data):  # the best file's folder is full: its temporary cannot be written
        if path.name == "ck.best.npz":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(_io, "_stage", stage)
    result = runner.invoke(app, [*args, "--force", "--seed", "1"])  # its first save is a best one: refused whole
    assert result.exit_code == 1 and "its best file" in result.output and "No space left" in result.output
    assert {p: p.read_bytes() for p in (ck, best)} == before  # the earlier run's pair, both as they were
    assert sorted(p.name for p in tmp_path.iterdir()) == ["book.txt", "ck.best.npz", "ck.npz"]  # no temporary

    monkeypatch.setattr(_io, "_stage", real)
    assert runner.invoke(app, [*args, "--steps", "6", "--resume"]).exit_code == 0  # a later best save: both files
    history = load_checkpoint(ck).history
    assert load_checkpoint(best).state.step == history.best()[0]  # the best file holds the step its history names


def test_the_torch_module_refuses_an_input_changed_in_place_before_backward_and_allows_create_graph():
    torch = pytest.importorskip("torch")
    from gpubptt.torch import Recurrent

    gru = torch.nn.GRU(3, 4, dtype=torch.float64)
    rec = Recurrent.from_module(gru, backend="numpy")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out, _ = rec(x)
    x.mul_(2)  # the pullback would read the new x for dU: torch's own check refuses it, as for nn.GRU
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out**2).sum().backward()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad((gru(x)[0] ** 2).sum(), x)  # torch's own GRU, the reference
    (ours,) = torch.autograd.grad((rec(x)[0] ** 2).sum(), x, create_graph=True)  # first order under create_graph
    torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-12)


def test_a_model_state_without_the_parameter_name_cache_loads_and_runs():
    """A model pickled before ``recurrence_params`` cached its names has no ``_param_names``: it still runs."""
    import pickle

    m = gpubptt.RNN(3, 4, 5, num_layers=2, cell="lstm", backend="numpy", dtype="float64", seed=0)
    state = m.__getstate__()
    assert "_param_names" not in state  # not pickled: remade on first use
    old = gpubptt.RNN.__new__(gpubptt.RNN)
    old.__setstate__(state)
    x, y = np.random.default_rng(0).normal(size=(6, 2, 3)), np.zeros((6, 2), int)
    assert old.loss_and_grads(x, y)[0] == pytest.approx(m.loss_and_grads(x, y)[0], rel=1e-12)
    assert pickle.loads(pickle.dumps(m)).loss_and_grads(x, y)[0] == pytest.approx(m.loss_and_grads(x, y)[0], rel=1e-12)


def test_the_torch_module_keeps_the_wrapped_models_precision_and_refuses_it_for_float64():
    torch = pytest.importorskip("torch")
    from gpubptt.torch import Recurrent

    model = gpubptt.RNN(3, 16, 2, cell="gru", backend="numpy", seed=0, precision="bf16")
    model.params["W"][...] *= 8  # large enough that bf16's rounding shows in the states
    rec = Recurrent(model)
    x = torch.randn(5, 2, 3)
    out = rec(x)[0].detach().numpy()
    bf16 = model.vjp(x.numpy())[0].states  # torch's zero bias_hh: the same summed biases
    model.precision = "fp32"
    fp32 = model.vjp(x.numpy())[0].states
    assert rec.precision == "bf16" and np.abs(out - bf16).max() <= 1e-6 < np.abs(out - fp32).max()
    lstm = torch.nn.LSTM(3, 4).double()
    assert Recurrent.from_module(lstm).precision == "fp32"
    with pytest.raises(gpubptt.InputTypeError, match=r"precision='tf32', float32 only.*float64"):
        Recurrent.from_module(lstm, precision="tf32")(torch.randn(5, 2, 3, dtype=torch.float64))


def test_host_scratch_lets_outgrown_buffers_go():
    from gpubptt.backend.precision import Scratch

    scratch = Scratch()
    for n in (10, 100, 1000):
        scratch.get("a", (n,), np.float32, np)
    assert len(scratch._local.pools[("a", np.dtype(np.float32).str)]) == 1  # only the largest is held


def test_to_keeps_how_the_model_reads_its_inputs_and_scores_its_outputs():
    model = gpubptt.RNN(3, 4, 2, backend="numpy", dtype="float64", seed=0)
    model.batch_first, model.head = True, "mse"
    x, y = np.random.default_rng(0).normal(size=(2, 5, 3)), np.random.default_rng(1).normal(size=(2, 5, 2))  # (B, T, ·)
    copy = model.to("numpy")
    assert (copy.batch_first, copy.head) == (True, "mse")
    assert float(copy.loss(x, y)) == float(model.loss(x, y))


def test_gradcheck_takes_any_layout_of_s0_and_the_models_head_and_batch_first():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, (4, 3)), rng.integers(0, 3, (4, 3))
    s0 = rng.normal(size=(4, 3)).T  # a transposed view: its reshape is a copy
    frozen = rng.normal(size=(3, 4))
    frozen.flags.writeable = False
    for s in (s0, np.asfortranarray(s0), frozen):
        before = s.copy()
        assert gpubptt.gradcheck(model, x, y, s).errors["s0"] < 1e-6  # the numeric s0 gradient is not 0
        np.testing.assert_array_equal(s, before)  # the caller's s0 as it was
    model.head = "last_softmax"
    assert gpubptt.gradcheck(model, x, y[-1]).max_rel_error < 1e-6  # the (B,) labels of the model's head
    model.head, model.batch_first = "softmax", True
    assert gpubptt.gradcheck(model, x.T, y.T, lengths=[4, 3, 2]).max_rel_error < 1e-6


def test_model_config_checks_its_fields_and_from_params_names_the_missing_bias():
    model = gpubptt.RNN(3, 4, 3, backend="numpy", num_layers=2)
    for field, value, message in [
        ("hidden_size", 6.0, "ModelConfig.hidden_size must be a positive int"),
        ("bias", "yes", "ModelConfig.bias must be a bool"),
        ("cell", "rnn", "ModelConfig.cell must be a cell object"),
        ("dtype", "int32", "ModelConfig.dtype must be float32 or float64"),
        ("dtype", "no-such-dtype", "ModelConfig.dtype must be float32 or float64"),  # np.dtype("f8") == None
        ("dtype", None, "ModelConfig.dtype must be float32 or float64"),
    ]:
        with pytest.raises((gpubptt.InputError, gpubptt.InputTypeError), match=message):
            dataclasses.replace(model.config, **{field: value})
    same = dataclasses.replace(model.config, hidden_size=np.int64(4), bias=np.True_, dtype="float32")
    assert same == model.config and type(same.hidden_size) is int and type(same.bias) is bool
    params = {k: np.asarray(v) for k, v in model.params.items() if k not in ("b", "b_l1")}  # c without any b
    with pytest.raises(gpubptt.InputError, match=r"missing \['b', 'b_l1'\]; expected both biases"):
        gpubptt.RNN.from_params(params, backend="numpy")


def test_ragged_or_overflowing_targets_and_upstream_gradients_are_named():
    model = gpubptt.RNN(3, 4, 2, backend="numpy", seed=0)
    x = np.zeros((2, 2, 3), np.float32)
    with pytest.raises(gpubptt.ShapeError, match="y is a ragged nested sequence"):
        model.loss(x, [[0.0], [0.0, 1.0]], head="mse")
    with pytest.raises(gpubptt.InputError, match="targets y has values too large for float32"):
        model.loss(x, np.full((2, 2, 2), 1e300), head="mse")
    _, pullback = model.vjp(x)
    with pytest.raises(gpubptt.ShapeError, match="d_states is a ragged nested sequence"):
        pullback([[1.0], [1.0, 2.0]])
    with pytest.raises(gpubptt.InputError, match="needs at least one counted step"):  # as the softmax head
        model.loss_and_grads(x, np.zeros((2, 2, 2)), head="mse", lengths=[0, 0], reduction="mean")
    with pytest.raises(gpubptt.InputError, match="dropout_seed=1 runs under the 'softmax' head only"):
        model.loss(x, np.zeros((2, 2, 2)), head="mse", dropout_seed=1)  # as loss_and_grads, dropout or not
