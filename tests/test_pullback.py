"""The recurrent stack's pullback (``model.vjp``) against torch autograd in float64, under a random
custom loss on the outputs and the final state (not a sum): every parameter's gradient, ∂E/∂x, ∂E/∂h0
(and ∂E/∂c0), for each cell × layers × directions × bias × h0 × lengths (a deterministic sample of
the product), tokens included; and its errors. Skipped without torch for the parity part."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt
from gpubptt.engine.pullback import PullbackError

D, H, T, B = 3, 4, 5, 3
LENS = np.array([5, 2, 0])


def _combos():
    full = list(itertools.product(["rnn", "gru", "lstm"], [1, 2, 3], [False, True], [False, True], [False, True],
                                  [False, True]))  # fmt: skip
    rng = np.random.default_rng(20)
    keep = sorted(rng.choice(len(full), size=24, replace=False))  # a fixed quarter of the 144
    return [full[i] for i in keep] + [("lstm", 2, True, True, True, True), ("gru", 1, False, True, True, False)]


def _torch_reference(torch, module, x, hx, lengths):
    """(output (T, B, H·dirs) zero on padded steps, h_n, c_n or None) through packed sequences."""
    is_lstm = isinstance(module, torch.nn.LSTM)
    if lengths is None:
        out, state = module(x, hx)
    else:
        keep = np.flatnonzero(lengths > 0)  # torch refuses empty sequences: they keep their h0
        sub = None if hx is None else tuple(h[:, keep] for h in hx) if is_lstm else hx[:, keep]
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            x[:, keep], torch.as_tensor(lengths[keep]), enforce_sorted=False
        )
        o, st = module(packed, sub)
        o, _ = torch.nn.utils.rnn.pad_packed_sequence(o, total_length=x.shape[0])
        n, dirs_h = module.num_layers * (2 if module.bidirectional else 1), module.hidden_size
        out = torch.zeros(x.shape[0], x.shape[1], o.shape[2], dtype=o.dtype)
        out[:, keep] = o  # autograd records the copy
        parts = st if is_lstm else (st,)
        full = []
        for j, p in enumerate(parts):
            base = torch.zeros(n, x.shape[1], dirs_h, dtype=o.dtype) if hx is None else (hx[j] if is_lstm else hx)
            full.append(base.clone())
            full[-1][:, keep] = p
        state = tuple(full) if is_lstm else full[0]
    return (out, *state) if is_lstm else (out, state, None)


@pytest.mark.parametrize("cell,layers,bidir,bias,h0,lengths", _combos())
def test_pullback_matches_torch_autograd_under_a_custom_loss(cell, layers, bidir, bias, h0, lengths):
    torch = pytest.importorskip("torch")
    torch.manual_seed(layers + 3 * bidir)
    module = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](
        D, H, num_layers=layers, bias=bias, bidirectional=bidir
    ).double()
    dirs, n = 1 + bidir, layers * (1 + bidir)
    rnn_sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    model = gpubptt.RNN.from_torch(
        rnn_sd, {"weight": np.zeros((1, H * dirs))}, cell=cell, backend="numpy", dtype="float64"
    )
    rng = np.random.default_rng(layers)
    x = torch.as_tensor(rng.normal(size=(T, B, D))).requires_grad_(True)
    hx = None
    if h0:
        hx = torch.as_tensor(rng.normal(size=(n, B, H))).requires_grad_(True)
        if cell == "lstm":
            hx = (hx, torch.as_tensor(rng.normal(size=(n, B, H))).requires_grad_(True))
    lens = LENS if lengths else None
    out, h_n, c_n = _torch_reference(torch, module, x, hx, lens)
    Wy, Wh, Wc = (torch.as_tensor(rng.normal(size=s)) for s in [(T, B, H * dirs), (n, B, H), (n, B, H)])
    E = (torch.sin(out) * Wy).sum() + (h_n**2 * Wh).sum() + (0 if c_n is None else (torch.tanh(c_n) * Wc).sum())
    E.backward()

    s0 = None if hx is None else tuple(h.detach().numpy() for h in hx) if cell == "lstm" else hx.detach().numpy()
    # recomputation (segments of 2 steps) where it applies: one direction
    recompute = 2 if not bidir else None
    o, pullback = model.vjp(x.detach().numpy(), s0, lengths=lens, recompute=recompute)
    np.testing.assert_allclose(o.states, out.detach().numpy(), rtol=1e-12, atol=1e-12)
    fin_h, fin_c = o.final_state if cell == "lstm" else (o.final_state, None)
    d_final = 2 * fin_h * Wh.numpy().reshape(fin_h.shape)
    if cell == "lstm":
        d_final = (d_final, (1 - np.tanh(fin_c) ** 2) * Wc.numpy().reshape(fin_c.shape))
    g = pullback(np.cos(o.states) * Wy.numpy(), d_final)
    head = {k: np.zeros(model.params[k].shape) for k in ("V", "c") if k in model.params}  # no head: zero gradients
    ours, _ = model.to_torch({**{k: v for k, v in g.items() if k != "x"}, **head})

    def close(a, b):
        assert np.abs(a - b).max() <= 1e-9 * max(np.abs(b).max(), 1e-300)

    for name, p in module.named_parameters():
        close(ours[name], p.grad.numpy())
    close(g["x"], x.grad.numpy())
    if h0:
        hs = hx if cell == "lstm" else (hx,)
        close(g["s0"].reshape(n, B, H), hs[0].grad.numpy())
        if cell == "lstm":
            close(g["c0"].reshape(n, B, H), hs[1].grad.numpy())


@pytest.mark.parametrize("recompute", [None, "sqrt"])
def test_pullback_with_token_ids_matches_the_dense_one_hot_pullback(recompute):
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, 2, cell="gru", num_layers=2, bias=True, backend="numpy", dtype="float64", seed=1)
    ids = rng.integers(0, D, size=(T, B))
    dY = rng.normal(size=(T, B, H))
    _, pb_ids = model.vjp(ids, lengths=LENS, recompute=recompute)
    _, pb_dense = model.vjp(np.eye(D)[ids], lengths=LENS, recompute=recompute)
    g_ids, g_dense = pb_ids(dY), pb_dense(dY)
    assert "x" not in g_ids and g_dense["x"].shape == (T, B, D)
    for k in g_ids:
        np.testing.assert_allclose(g_ids[k], g_dense[k], rtol=1e-12, atol=1e-14)


def test_pullback_refuses_bad_upstream_gradients_and_a_second_call():
    model = gpubptt.RNN(D, H, 2, cell="lstm", backend="numpy", dtype="float64", seed=0)
    x = np.zeros((T, B, D))
    _, pb = model.vjp(x)
    with pytest.raises(gpubptt.ShapeError, match=r"d_states must have shape \(5, 3, 4\)"):
        pb(np.zeros((T, B, H + 1)))
    with pytest.raises(gpubptt.InputTypeError, match="pair"):
        pb(np.zeros((T, B, H)), np.zeros((B, H)))
    with pytest.raises(gpubptt.ShapeError, match="d_final_state"):
        pb(np.zeros((T, B, H)), (np.zeros((2, B, H)), None))
    with pytest.raises(gpubptt.InputTypeError, match="floating point"):
        pb(np.zeros((T, B, H), dtype=np.int64))

    class Foreign:  # another library's array (a device tensor, say)
        def __array__(self, dtype=None, copy=None):
            return np.zeros((T, B, H))

    with pytest.raises(gpubptt.BackendMismatchError, match="d_states"):
        pb(Foreign())
    pb(np.ones((T, B, H)), (None, np.ones((B, H))))  # bad calls consumed nothing
    with pytest.raises(PullbackError, match="already called"):
        pb(np.ones((T, B, H)))
    with pytest.raises(gpubptt.InputError, match="bidirectional"):
        gpubptt.RNN(D, H, 2, bidirectional=True, backend="numpy").vjp(x, recompute="sqrt")
    with pytest.raises(gpubptt.InputError, match="not 'auto'"):
        model.vjp(x, recompute="auto")


@pytest.mark.parametrize("recompute", [None, 2])
def test_lstm_pullback_of_c_n_with_sequences_that_end_at_the_same_step(recompute):
    """∂E/∂c_n enters at each sequence's own last step, several sequences sharing one (torch autograd)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(7)
    module = torch.nn.LSTM(D, H, num_layers=2).double()
    lens = np.array([4, 6, 4, 1, 6])
    Bt = len(lens)
    rng = np.random.default_rng(7)
    x = torch.as_tensor(rng.normal(size=(6, Bt, D))).requires_grad_(True)
    out, _, c_n = _torch_reference(torch, module, x, None, lens)
    Wc = torch.as_tensor(rng.normal(size=(2, Bt, H)))
    ((torch.tanh(c_n) * Wc).sum() + out.sum()).backward()
    rnn_sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    model = gpubptt.RNN.from_torch(rnn_sd, {"weight": np.zeros((1, H))}, cell="lstm", backend="numpy", dtype="float64")
    o, pullback = model.vjp(x.detach().numpy(), lengths=lens, recompute=recompute)
    _, fin_c = o.final_state
    g = pullback(np.ones_like(o.states), (None, (1 - np.tanh(fin_c) ** 2) * Wc.numpy()))
    ours, _ = model.to_torch({**{k: v for k, v in g.items() if k != "x"}, "V": np.zeros((1, H)), "c": np.zeros(1)})
    for name, p in module.named_parameters():
        assert np.abs(ours[name] - p.grad.numpy()).max() <= 1e-9 * np.abs(p.grad.numpy()).max()
    assert np.abs(g["x"] - x.grad.numpy()).max() <= 1e-9 * np.abs(x.grad.numpy()).max()


@pytest.mark.parametrize("recompute", [None, 2])
def test_pullback_of_the_final_state_alone_without_dx_matches_torch_autograd(recompute):
    """d_states None (a loss on h_n alone) is a zero upstream gradient; want_dx=False leaves out ∂E/∂x only."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(8)
    module = torch.nn.GRU(D, H, num_layers=2).double()
    rng = np.random.default_rng(8)
    x = torch.as_tensor(rng.normal(size=(T, B, D)))
    lens = np.array([5, 2, 3])
    _, h_n, _ = _torch_reference(torch, module, x, None, lens)
    Wh = torch.as_tensor(rng.normal(size=(2, B, H)))
    (h_n**2 * Wh).sum().backward()
    rnn_sd = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    model = gpubptt.RNN.from_torch(rnn_sd, {"weight": np.zeros((1, H))}, cell="gru", backend="numpy", dtype="float64")
    o, pullback = model.vjp(x.numpy(), lengths=lens, recompute=recompute)
    g = pullback(None, 2 * o.final_state * Wh.numpy(), want_dx=False)
    assert "x" not in g
    ours, _ = model.to_torch({**g, "V": np.zeros((1, H)), "c": np.zeros(1)})
    for name, p in module.named_parameters():
        assert np.abs(ours[name] - p.grad.numpy()).max() <= 1e-9 * np.abs(p.grad.numpy()).max()


@pytest.mark.parametrize("recompute", [None, 2])
@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_the_pullback_reads_the_inputs_as_they_were_at_the_vjp(cell, recompute):
    model = gpubptt.RNN(3, 4, 3, cell=cell, backend="numpy", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x, h0 = rng.normal(size=(5, 2, 3)), rng.normal(size=(2, 4))  # the model's dtype: taken without a copy
    s0 = (h0, h0 + 1) if cell == "lstm" else h0
    out, pullback = model.vjp(x, s0, recompute=recompute)
    d = rng.normal(size=out.states.shape)
    ref = model.vjp(x.copy(), tuple(a.copy() for a in s0) if cell == "lstm" else h0.copy(), recompute=recompute)[1](d)
    x[...] = 0  # the caller refills its buffers before it calls the pullback
    h0[...] = 0
    got = pullback(d)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_upstream_gradients_past_the_models_range_are_refused_nan_passes_on():
    """A float64 1e300 into a float32 model's pullback became inf in every gradient, without a word."""
    model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    x = np.zeros((5, 2), np.int64)
    out, pull = model.vjp(x)
    big = np.zeros(out.states.shape)
    big[2, 1, 3] = 1e300
    with pytest.raises(
        gpubptt.InputError, match=r"d_states has values too large for float32 \(\|value\| up to 1e\+300\)"
    ):
        pull(big)
    nan = np.zeros(out.states.shape, np.float32)
    nan[4, 0, 0] = np.nan
    g = pull(nan)  # the refusal left the pullback usable; NaN passes on, as torch's autograd passes it
    assert np.isnan(g["W"]).any()
