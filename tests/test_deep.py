"""Deep and bidirectional models (torch.nn.RNN's stack + Linear): loss, outputs, final states and exact
gradients against a per-sequence reference written from torch's definition, and against central
differences of that reference, in float64. No torch needed (tests/test_torch_parity.py adds torch)."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest

import gpubptt
from tests.reference import numeric, ref_stack_loss, ref_stack_one

D, H, K, T, B = 3, 4, 5, 5, 3

STRUCTURES = list(itertools.product([1, 2, 3], [False, True], ["tanh", "relu"]))
# (bias, tokens, h0, lengths, reduction): every option on, every option off, and two mixes
VARIANTS = [
    (True, True, True, True, "mean"),
    (False, False, False, False, "sum"),
    (True, False, True, False, "sum"),
    (False, True, False, True, "mean"),
]


def build(layers, bidirectional, nonlinearity, bias, seed=0, dropout=0.0):
    return gpubptt.RNN(
        D, H, K, num_layers=layers, bidirectional=bidirectional, nonlinearity=nonlinearity, bias=bias,
        backend="numpy", dtype="float64", init="torch", seed=seed, dropout=dropout,
    )  # fmt: skip


def inputs(rng, tokens, h0, lengths, n_states):
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    s0 = rng.normal(size=(n_states, B, H)) * 0.5 if h0 else None
    lens = np.array([T, 2, 0][:B]) if lengths else None
    return x, y, s0, lens


@pytest.mark.parametrize("layers,bidirectional,nonlinearity", STRUCTURES)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_loss_outputs_and_final_states_match_the_reference(layers, bidirectional, nonlinearity, variant):
    bias, tokens, h0, lengths, reduction = VARIANTS[variant]
    model = build(layers, bidirectional, nonlinearity, bias, seed=variant)
    rng = np.random.default_rng(10 + variant)
    x, y, s0, lens = inputs(rng, tokens, h0, lengths, model.num_states)
    p = {k: np.array(v) for k, v in model.params.items()}
    kw = dict(nonlinearity=nonlinearity, num_layers=layers, bidirectional=bidirectional)
    want = ref_stack_loss(p, x, y, s0, lens, reduction, **kw)
    np.testing.assert_allclose(float(model.loss(x, y, s0, lengths=lens, reduction=reduction)), want, rtol=1e-12)
    loss, grads, final = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction, return_final_state=True)
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)
    out = model.forward(x, s0, lengths=lens)
    dirs = 2 if bidirectional else 1
    assert out.states.shape == (T, B, H * dirs)
    flat = s0 is None and model.num_states == 1
    assert final.shape == ((B, H) if flat else (model.num_states, B, H))
    assert grads["s0"].shape == final.shape
    np.testing.assert_array_equal(out.final_state, final)
    for b in range(B):
        n = T if lens is None else lens[b]
        h = np.zeros((model.num_states, H)) if s0 is None else s0[:, b]
        top, finals = ref_stack_one(p, x[:n, b], h, layers, bidirectional, nonlinearity)
        np.testing.assert_allclose(out.states[:n, b], top, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(out.states[n:, b], 0)  # padded steps: zero
        np.testing.assert_allclose(final[b] if flat else final[:, b], finals[0] if flat else finals, rtol=1e-12)


@pytest.mark.parametrize("layers,bidirectional,nonlinearity", STRUCTURES)
@pytest.mark.parametrize("variant", [0, 1])
def test_gradients_match_central_differences_of_the_reference(layers, bidirectional, nonlinearity, variant):
    bias, tokens, h0, lengths, reduction = VARIANTS[variant]
    model = build(layers, bidirectional, nonlinearity, bias, seed=20 + variant)
    rng = np.random.default_rng(30 + variant)
    x, y, s0, lens = inputs(rng, tokens, h0 or True, lengths, model.num_states)
    _, grads = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction)
    p = {k: np.array(v) for k, v in model.params.items()}
    kw = dict(nonlinearity=nonlinearity, num_layers=layers, bidirectional=bidirectional)
    f = lambda: ref_stack_loss(p, x, y, s0, lens, reduction, **kw)  # noqa: E731
    for name, arr in [*p.items(), ("s0", s0)]:
        idx = rng.choice(arr.size, min(arr.size, 12), replace=False)  # a sample of each array's coordinates
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


def test_parameter_names_follow_torchs_suffixes():
    model = build(3, True, "tanh", True)
    names = list(model.params)
    assert names[:4] == ["U", "W", "U_reverse", "W_reverse"]
    assert {"U_l2_reverse", "W_l1", "b_l2_reverse", "b", "c"} <= set(names)
    assert model.params["U_l1"].shape == (H, 2 * H) and model.params["V"].shape == (K, 2 * H)
    assert len(names) == 3 * 2 * 3 + 2
    rnn_sd, lin_sd = model.to_torch()
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    assert set(rnn_sd) == {f"{w}_l{l}{r}" for w in kinds for l in range(3) for r in ("", "_reverse")}
    again = gpubptt.RNN.from_torch(rnn_sd, lin_sd, backend="numpy")
    assert (again.num_layers, again.bidirectional, again.bias) == (3, True, True)
    x = np.arange(T * B).reshape(T, B) % D
    np.testing.assert_allclose(again.forward(x).probs, model.forward(x).probs, rtol=1e-12)


def test_the_one_layer_model_keeps_its_names_shapes_and_numbers():
    old = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", bias=True, init="torch", seed=3)
    assert list(old.params) == ["U", "W", "V", "b", "c"]
    x = np.arange(T * B).reshape(T, B) % D
    _, g = old.loss_and_grads(x, x % K)
    assert g["s0"].shape == (B, H)
    _, g3 = old.loss_and_grads(x, x % K, np.zeros((1, B, H)))  # torch's h0 layout is accepted too
    assert g3["s0"].shape == (1, B, H)
    np.testing.assert_array_equal(g3["s0"][0], g["s0"])


def test_truncation_covering_every_step_is_full_bptt_and_shorter_windows_change_deep_gradients():
    model = build(2, True, "tanh", True, seed=4)
    rng = np.random.default_rng(4)
    x, y, s0, lens = inputs(rng, False, True, True, model.num_states)
    _, full = model.loss_and_grads(x, y, s0, lengths=lens)
    _, same = model.loss_and_grads(x, y, s0, lengths=lens, truncate=T - 1)
    _, cut = model.loss_and_grads(x, y, s0, lengths=lens, truncate=1)
    for k in full:
        np.testing.assert_allclose(same[k], full[k], rtol=1e-12, atol=1e-15)
    assert not np.allclose(cut["W"], full["W"]) and not np.allclose(cut["W_l1_reverse"], full["W_l1_reverse"])
    np.testing.assert_allclose(cut["V"], full["V"], rtol=1e-12)  # the output layer is never truncated


@pytest.mark.parametrize(
    "kwargs,err,fragment",
    [
        (dict(num_layers=0), gpubptt.InputError, "num_layers must be ≥ 1"),
        (dict(num_layers=2.0), gpubptt.InputTypeError, "num_layers must be a positive int"),
        (dict(num_layers=2, dropout=1.0), gpubptt.InputError, "dropout must lie in [0, 1)"),
        (dict(num_layers=2, dropout=-0.1), gpubptt.InputError, "dropout must lie in [0, 1)"),
        (dict(num_layers=2, dropout="0.5"), gpubptt.InputTypeError, "dropout must be a number"),
        (dict(bidirectional="yes"), gpubptt.InputTypeError, "bidirectional must be a bool"),
        (dict(nonlinearity="sigmoid"), gpubptt.InputError, "unknown nonlinearity 'sigmoid'"),
        (dict(cell="transformer"), gpubptt.InputError, "unknown cell 'transformer'"),
    ],
)
def test_bad_architectures_are_refused(kwargs, err, fragment):
    with pytest.raises(err) as info:
        gpubptt.RNN(D, H, K, backend="numpy", **kwargs)
    assert fragment in str(info.value)


def test_dropout_with_one_layer_warns_as_torch_does_and_changes_nothing():
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        model = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", dropout=0.5, seed=1)
    plain = gpubptt.RNN(D, H, K, backend="numpy", dtype="float64", seed=1)
    x = np.arange(T * B).reshape(T, B) % D
    np.testing.assert_array_equal(model.loss_and_grads(x, x % K)[1]["W"], plain.loss_and_grads(x, x % K)[1]["W"])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_s0_in_the_wrong_layout_is_refused_naming_the_expected_shape(bidirectional):
    model = build(2, bidirectional, "tanh", False)
    n = model.num_states
    x = np.zeros((T, B), dtype=np.int64)
    with pytest.raises(gpubptt.ShapeError, match=rf"s0 must have shape \(num_layers·dirs, B, H\) = \({n}, {B}, {H}\)"):
        model.loss_and_grads(x, x, np.zeros((B, H)))
    with pytest.raises(gpubptt.ShapeError, match=r"\(num_layers·dirs, B, H\)"):
        model.forward(x, np.zeros((n + 1, B, H)))


def test_dropout_gradients_are_exact_for_the_masks_drawn():
    model = build(3, True, "tanh", True, seed=5, dropout=0.4)
    rng = np.random.default_rng(5)
    x, y, s0, lens = inputs(rng, False, True, True, model.num_states)
    report = gpubptt.gradcheck(model, x, y, s0, lengths=lens, max_coords=15, dropout_seed=7)
    assert max(report.errors.values()) < 1e-6, report


@pytest.mark.parametrize("where", ["run", "backward_stack"])
def test_a_call_that_fails_after_drawing_its_masks_leaves_the_generator_as_it_was(monkeypatch, where):
    """The next call gets the masks the failed one drew: its results are a never-failing copy's, bit for bit."""
    model = build(2, True, "tanh", False, seed=8, dropout=0.5)
    x, y, _, _ = inputs(np.random.default_rng(8), True, False, False, model.num_states)
    never = copy.deepcopy(model)  # the same weights and generator state

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    target = gpubptt.engine.stack.Workspace if where == "run" else gpubptt.engine.stack
    monkeypatch.setattr(target, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.loss_and_grads(x, y)  # the masks were drawn (Workspace.load) before the failure
    monkeypatch.undo()
    for _ in range(2):
        (loss, grads), (ref_loss, ref_grads) = model.loss_and_grads(x, y), never.loss_and_grads(x, y)
        assert float(loss) == float(ref_loss)
        for k in ref_grads:
            np.testing.assert_array_equal(grads[k], ref_grads[k], err_msg=k)


def test_dropout_masks_the_layer_outputs_and_only_in_training():
    p_drop = 0.5
    model = build(2, False, "tanh", False, seed=6, dropout=p_drop)
    plain = gpubptt.RNN.from_params(model.params, backend="numpy")  # same weights, no dropout
    rng = np.random.default_rng(6)
    x, y, _, _ = inputs(rng, True, False, False, 2)
    np.testing.assert_array_equal(model.forward(x).probs, plain.forward(x).probs)  # forward never drops
    np.testing.assert_array_equal(model.loss(x, y), plain.loss(x, y))
    seeded = [model.loss_and_grads(x, y, dropout_seed=3) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0][1]["W_l1"], seeded[1][1]["W_l1"])  # a seed fixes the masks
    np.testing.assert_allclose(float(seeded[0][0]), float(model.loss(x, y, dropout_seed=3)), rtol=1e-12)
    drawn = [float(model.loss_and_grads(x, y)[0]) for _ in range(3)]  # the model's generator: new masks each call
    assert len(set(drawn)) == 3 and float(plain.loss(x, y)) not in drawn
    # the masks are inverted dropout: layer 1 reads layer 0's outputs times 0 or 1/(1−p), in that proportion
    big = gpubptt.RNN(D, 64, K, num_layers=2, dropout=p_drop, backend="numpy", dtype="float64", seed=1)
    stack = gpubptt.engine.stack.Stack(big, 40, 50, dropout=True)
    stack.draw_masks(big.backend.random_generator(0), p_drop)
    values, counts = np.unique(stack.M[0], return_counts=True)
    np.testing.assert_allclose(values, [0.0, 1 / (1 - p_drop)])
    assert abs(counts[0] / counts.sum() - p_drop) < 0.01  # 128,000 draws: 4 standard deviations
