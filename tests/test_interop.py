"""PyTorch interchange: state dicts of nn.RNN + nn.Linear to a model and back, checked by their keys,
shapes and values without torch, and against nn.RNN itself where torch is installed."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt import interop

D, H, K = 5, 4, 3


def torch_like(rng, *, rnn_bias=True, linear_bias=True):
    """State dicts with torch's names and shapes, as NumPy arrays."""
    rnn = {"weight_ih_l0": rng.normal(size=(H, D)), "weight_hh_l0": rng.normal(size=(H, H)) * 0.4}
    if rnn_bias:
        rnn.update(bias_ih_l0=rng.normal(size=H), bias_hh_l0=rng.normal(size=H))
    lin = {"weight": rng.normal(size=(K, H))}
    if linear_bias:
        lin["bias"] = rng.normal(size=K)
    return rnn, lin


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_from_torch_computes_what_nn_rnn_computes_from_those_weights(nonlinearity):
    rng = np.random.default_rng(0)
    rnn, lin = torch_like(rng)
    model = gpubptt.RNN.from_torch(rnn, lin, nonlinearity=nonlinearity, backend="numpy", dtype="float64")
    x = rng.normal(size=(6, 2, D))
    out = model.forward(x)
    for b in range(2):
        h = np.zeros(H)  # h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), written out from the state dicts
        for t in range(6):
            a = rnn["weight_ih_l0"] @ x[t, b] + rnn["bias_ih_l0"] + rnn["weight_hh_l0"] @ h + rnn["bias_hh_l0"]
            h = np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0)
        np.testing.assert_allclose(out.final_state[b], h, rtol=1e-12)
        z = lin["weight"] @ h + lin["bias"]
        np.testing.assert_allclose(out.probs[-1, b], np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-12)


@pytest.mark.parametrize("rnn_bias,linear_bias", [(True, True), (False, False), (True, False), (False, True)])
def test_round_trip_keeps_the_function_and_the_names(rnn_bias, linear_bias):
    rng = np.random.default_rng(1)
    rnn, lin = torch_like(rng, rnn_bias=rnn_bias, linear_bias=linear_bias)
    model = gpubptt.RNN.from_torch(rnn, lin, backend="numpy", dtype="float64")
    assert model.bias == (rnn_bias or linear_bias)  # one bias alone: the other is zero, the same function
    back_rnn, back_lin = model.to_torch()
    again = gpubptt.RNN.from_torch(back_rnn, back_lin, backend="numpy", dtype="float64")
    x = rng.integers(0, D, size=(5, 3))
    np.testing.assert_array_equal(again.forward(x).probs, model.forward(x).probs)
    if model.bias:
        np.testing.assert_array_equal(back_rnn["bias_hh_l0"], 0)
        want_b = (rnn["bias_ih_l0"] + rnn["bias_hh_l0"]) if rnn_bias else np.zeros(H)
        np.testing.assert_allclose(back_rnn["bias_ih_l0"], want_b, rtol=1e-15)
    else:
        assert sorted(back_rnn) == ["weight_hh_l0", "weight_ih_l0"] and sorted(back_lin) == ["weight"]


def test_gradients_go_to_torchs_names_and_each_bias_gets_db():
    model = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", bias=True, init="torch", seed=2)
    x = np.arange(12).reshape(4, 3) % D
    _, grads = model.loss_and_grads(x, x % K)
    g_rnn, g_lin = model.to_torch(grads=grads)
    np.testing.assert_array_equal(g_rnn["weight_hh_l0"], grads["W"])
    np.testing.assert_array_equal(g_rnn["bias_ih_l0"], grads["b"])
    np.testing.assert_array_equal(g_rnn["bias_hh_l0"], grads["b"])
    np.testing.assert_array_equal(g_lin["bias"], grads["c"])


@pytest.mark.parametrize(
    "edit,err,fragment",
    [
        (lambda r, l: r.pop("weight_hh_l0"), gpubptt.InputError, "missing 'weight_hh_l0'"),
        (lambda r, l: r.update(extra=np.zeros(2)), gpubptt.InputError, "unexpected key 'extra'"),
        (lambda r, l: r.update(weight_ih_l1=np.zeros((H, H))), gpubptt.InputError, "missing 'weight_hh_l1'"),
        (lambda r, l: r.update(weight_ih_l0_reverse=np.zeros((H, D))), gpubptt.InputError, "bidirectional"),
        (lambda r, l: r.pop("bias_hh_l0"), gpubptt.InputError, "missing 'bias_hh_l0' (biases come for every"),
        (lambda r, l: r.update(weight_hh_l0=np.zeros((H, H + 1))), gpubptt.ShapeError, "weight_hh_l0 must have shape"),
        (lambda r, l: l.update(weight=np.zeros((K, H + 1))), gpubptt.ShapeError, "nn.Linear weight must have shape"),
        (lambda r, l: l.update(bias=np.zeros(K + 1)), gpubptt.ShapeError, "nn.Linear bias must have shape"),
        (lambda r, l: r.update(weight_ih_l0=np.zeros((H, D), dtype=int)), gpubptt.InputTypeError, "must hold floats"),
    ],
)
def test_bad_state_dicts_are_refused_naming_the_key(edit, err, fragment):
    rnn, lin = torch_like(np.random.default_rng(3))
    edit(rnn, lin)
    with pytest.raises(err) as info:
        gpubptt.RNN.from_torch(rnn, lin, backend="numpy")
    assert fragment in str(info.value)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_nn_rnn_loads_to_torch_and_computes_the_same(nonlinearity):
    torch = pytest.importorskip("torch")
    model = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", bias=True, init="torch", seed=4,
                        nonlinearity=nonlinearity)  # fmt: skip
    rnn_sd, lin_sd = model.to_torch()
    rnn = torch.nn.RNN(D, H, nonlinearity=nonlinearity, dtype=torch.float64)
    lin = torch.nn.Linear(H, K, dtype=torch.float64)
    rnn.load_state_dict({k: torch.as_tensor(v) for k, v in rnn_sd.items()})
    lin.load_state_dict({k: torch.as_tensor(v) for k, v in lin_sd.items()})
    x = np.random.default_rng(5).normal(size=(6, 2, D))
    out, h_n = rnn(torch.as_tensor(x))
    np.testing.assert_allclose(model.forward(x).states, out.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(model.forward(x).final_state, h_n[0].detach().numpy(), rtol=1e-12)
    back = gpubptt.RNN.from_torch(rnn.state_dict(), lin.state_dict(), nonlinearity=nonlinearity, backend="numpy")
    np.testing.assert_allclose(back.forward(x).probs, model.forward(x).probs, rtol=1e-12)


def deep_state(rng, layers=2, bidirectional=True):
    dirs = 2 if bidirectional else 1
    rnn = {}
    for layer in range(layers):
        for sfx in ["", "_reverse"][:dirs]:
            d_in = D if layer == 0 else H * dirs
            rnn[f"weight_ih_l{layer}{sfx}"] = rng.normal(size=(H, d_in))
            rnn[f"weight_hh_l{layer}{sfx}"] = rng.normal(size=(H, H)) * 0.4
            rnn[f"bias_ih_l{layer}{sfx}"] = rng.normal(size=H)
            rnn[f"bias_hh_l{layer}{sfx}"] = rng.normal(size=H)
    return rnn, {"weight": rng.normal(size=(K, H * dirs)), "bias": rng.normal(size=K)}


@pytest.mark.parametrize(
    "edit,err,fragment",
    [
        (lambda r, l: r.pop("weight_hh_l1_reverse"), gpubptt.InputError, "missing 'weight_hh_l1_reverse'"),
        (lambda r, l: r.pop("bias_ih_l1"), gpubptt.InputError, "missing 'bias_ih_l1' (biases come for every"),
        (
            lambda r, l: r.update(weight_ih_l1=np.zeros((H, H))),
            gpubptt.ShapeError,
            "weight_ih_l1 must have shape (4, 8)",
        ),
        (
            lambda r, l: r.update(weight_ih_l3=np.zeros((H, 2 * H))),
            gpubptt.InputError,
            "missing 'weight_ih_l2' (the keys describe 4 layers",
        ),
        (lambda r, l: r.update(weight_hh_l0_backward=np.zeros((H, H))), gpubptt.InputError, "'weight_hh_l0_backward'"),
        (lambda r, l: l.update(weight=np.zeros((K, H))), gpubptt.ShapeError, "nn.Linear weight must have shape (K, 8)"),
    ],
)
def test_bad_deep_state_dicts_are_refused_naming_the_key(edit, err, fragment):
    rnn, lin = deep_state(np.random.default_rng(5))
    edit(rnn, lin)
    with pytest.raises(err) as info:
        gpubptt.RNN.from_torch(rnn, lin, backend="numpy")
    assert fragment in str(info.value)


def test_deep_state_dicts_round_trip_with_biases_folded():
    rnn, lin = deep_state(np.random.default_rng(6), layers=3)
    model = gpubptt.RNN.from_torch(rnn, lin, backend="numpy", dtype="float64")
    assert (model.num_layers, model.bidirectional) == (3, True)
    np.testing.assert_allclose(model.params["b_l2_reverse"], rnn["bias_ih_l2_reverse"] + rnn["bias_hh_l2_reverse"])
    back, back_lin = model.to_torch()
    assert set(back) == set(rnn) and set(back_lin) == set(lin)
    np.testing.assert_array_equal(back["bias_hh_l1"], 0)
    np.testing.assert_array_equal(back["weight_ih_l2_reverse"], rnn["weight_ih_l2_reverse"])


def test_to_torch_state_refuses_parameters_of_another_cell_than_it_is_told():
    """A GRU's parameters under the default cell="rnn" lost b_hn silently: nn.GRU loaded them and computed
    something else (0.37 off); malformed input raised KeyError/AttributeError."""
    gru = gpubptt.RNN(3, 4, 2, cell="gru", backend="numpy", dtype="float64", seed=0)
    lstm = gpubptt.RNN(3, 4, 2, cell="lstm", backend="numpy", dtype="float64", seed=0)
    with pytest.raises(gpubptt.InputError, match="params are not the rnn cell's"):
        interop.to_torch_state(gru.params)
    with pytest.raises(gpubptt.InputError, match="params are not the gru cell's"):
        interop.to_torch_state(lstm.params, cell="gru")
    with pytest.raises(gpubptt.InputError, match="params must hold U, W and V"):
        interop.to_torch_state({"U": gru.params["U"]}, cell="gru")
    with pytest.raises(gpubptt.InputTypeError):
        interop.to_torch_state([1, 2])
    rnn, _ = interop.to_torch_state(gru.params, cell="gru")  # the right cell: b_hn in bias_hh's n third
    np.testing.assert_array_equal(rnn["bias_hh_l0"][8:], gru.params["b_hn"])


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_a_float64_model_of_a_float32_module_adds_its_two_biases_exactly(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    mod = getattr(torch.nn, kind)(3, 16)
    with torch.no_grad():
        mod.bias_hh_l0.mul_(1e-3)  # small beside bias_ih: their float32 sum rounds
    lin = torch.nn.Linear(16, 5)
    model = gpubptt.RNN.from_torch(mod.state_dict(), lin.state_dict(), cell=kind.lower(), dtype="float64",
                                   backend="numpy")  # fmt: skip
    exact = (mod.bias_ih_l0.double() + mod.bias_hh_l0.double()).detach()
    b = model.params["b"]
    if kind == "GRU":  # the n third of bias_hh stays b_hn
        np.testing.assert_array_equal(b[:32], exact[:32].numpy())
    else:
        np.testing.assert_array_equal(b, exact.numpy())  # was off by ~1e-8: summed in float32, then widened


def test_tensors_without_values_are_refused_by_name():
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("gpubptt.torch")
    meta = torch.nn.GRU(3, 4, device="meta")
    with pytest.raises(gpubptt.InputTypeError, match="weight_ih_l0 holds no values"):
        gpubptt.RNN.from_torch(meta.state_dict(), torch.nn.Linear(4, 2).state_dict(), cell="gru")
    with pytest.raises(gpubptt.InputTypeError, match="holds no values"):
        gt.Recurrent.from_module(meta)
    sd = torch.nn.RNN(3, 4).state_dict()
    sd["weight_hh_l0"] = sd["weight_hh_l0"].to_sparse()
    with pytest.raises(gpubptt.InputTypeError, match=r"weight_hh_l0 is a torch\.sparse_coo tensor"):
        gpubptt.RNN.from_torch(sd, torch.nn.Linear(4, 2).state_dict())


def test_a_wrong_weight_ih_is_named_with_h_from_weight_hh():
    torch = pytest.importorskip("torch")
    sd = torch.nn.GRU(3, 4).state_dict()
    sd["weight_ih_l0"] = sd["weight_ih_l0"][:2]
    with pytest.raises(gpubptt.ShapeError, match=r"weight_ih_l0 must have shape \(12, 3\) \(H = 4 from weight_hh_l0"):
        gpubptt.RNN.from_torch(sd, torch.nn.Linear(4, 2).state_dict(), cell="gru")


def test_to_torch_state_names_what_is_missing_unexpected_or_misshapen():
    gru = gpubptt.RNN(3, 4, 2, cell="gru", num_layers=2, backend="numpy", dtype="float64", seed=0)
    params = dict(gru.params.copy())
    with pytest.raises(gpubptt.InputError, match="unexpected 0"):
        interop.to_torch_state({**params, 0: params["V"]}, cell="gru")  # a key that is not a name: no TypeError
    with pytest.raises(gpubptt.InputError, match=r"for 1 layer.*unexpected W_l1, b_l1, b_hn_l1"):
        interop.to_torch_state({k: v for k, v in params.items() if k != "U_l1"}, cell="gru")
    with pytest.raises(gpubptt.ShapeError, match=r"parameter b_hn must have shape \(4,\)"):
        interop.to_torch_state({**params, "b_hn": np.zeros(2)}, cell="gru")
