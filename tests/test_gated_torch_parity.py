"""Against torch autograd in float64: nn.GRU / nn.LSTM(num_layers, bidirectional, bias) + Linear + cross-entropy,
for every combination of cell × layers 1–2 (and 3 for some) × directions × bias × dense/tokens × h0 (and c0)
× lengths (packed sequences) × reduction: loss, every gradient (under torch's names, ∂E/∂h0 and ∂E/∂c0
included) and the final states (h_n, and c_n for the LSTM). Skipped without torch
(tests/test_gated.py checks the same math against a reference and finite differences)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt

torch = pytest.importorskip("torch")

D, H, K, T, B = 3, 4, 5, 6, 3
COMBOS = list(itertools.product(["gru", "lstm"], [1, 2], [False, True], [False, True], [False, True], [False, True],
                                [False, True], ["sum", "mean"]))  # fmt: skip
COMBOS += [("gru", 3, True, True, True, True, True, "mean"), ("lstm", 3, True, True, False, True, True, "sum")]
MODULES = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def torch_run(module, lin, x, y, hx, lengths, reduction, tokens):
    xt = torch.nn.functional.one_hot(torch.as_tensor(x), D).double() if tokens else torch.as_tensor(x)
    if lengths is None:
        out, state = module(xt, hx)
        mask = torch.ones(T, B, dtype=torch.bool)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.as_tensor(lengths), enforce_sorted=False)
        out, state = module(packed, hx)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
        mask = torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]
    logits = lin(out)[mask]
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)[mask], reduction=reduction)
    loss.backward()
    return loss, state


@pytest.mark.parametrize("cell,layers,bidir,bias,tokens,h0,lengths,reduction", COMBOS)
def test_matches_torch_autograd(cell, layers, bidir, bias, tokens, h0, lengths, reduction):
    torch.manual_seed(layers * 7 + bidir + 3 * bias)
    module = MODULES[cell](D, H, num_layers=layers, bias=bias, bidirectional=bidir).double()
    dirs = 2 if bidir else 1
    lin = torch.nn.Linear(H * dirs, K, bias=bias).double()
    rng = np.random.default_rng(1)
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    lens = np.array([T, 4, 1]) if lengths else None
    shape = (layers * dirs, B, H)
    s0, hx = None, None
    if h0:
        h0_ = rng.normal(size=shape) * 0.5
        if cell == "lstm":
            c0_ = rng.normal(size=shape)
            s0 = (h0_, c0_)
            hx = tuple(torch.as_tensor(a).requires_grad_(True) for a in s0)
        else:
            s0 = h0_
            hx = torch.as_tensor(h0_).requires_grad_(True)
    loss_t, state = torch_run(module, lin, x, y, hx, lens, reduction, tokens)
    model = gpubptt.RNN.from_torch(module.state_dict(), lin.state_dict(), cell=cell, backend="numpy")
    assert model.dtype == np.float64 and model.cell_name == cell
    loss, grads, final = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction, return_final_state=True)
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-12)
    finals = final if cell == "lstm" else (final,)
    states = state if cell == "lstm" else (state,)
    assert len(finals) == len(states)
    for ours, theirs in zip(finals, states, strict=True):
        np.testing.assert_allclose(np.reshape(ours, shape), theirs.detach().numpy(), rtol=1e-11, atol=1e-13)
    g_rnn, g_lin = model.to_torch(grads=grads)
    for name, param in [*module.named_parameters(), *(("lin." + k, v) for k, v in lin.named_parameters())]:
        ours = g_lin[name[4:]] if name.startswith("lin.") else g_rnn[name]
        np.testing.assert_allclose(ours, param.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    if h0:
        hxs = hx if cell == "lstm" else (hx,)
        for key, h in zip(("s0", "c0")[: len(hxs)], hxs, strict=True):
            np.testing.assert_allclose(grads[key], h.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dicts_round_trip_through_torch_modules(cell, bias):
    torch.manual_seed(5)
    module = MODULES[cell](D, H, num_layers=2, bias=bias, bidirectional=True).double()
    lin = torch.nn.Linear(2 * H, K, bias=bias).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # biases nonzero everywhere: b_hn must stay apart from b
    model = gpubptt.RNN.from_torch(module.state_dict(), lin.state_dict(), cell=cell, backend="numpy")
    rnn_sd, _ = model.to_torch()
    again = MODULES[cell](D, H, num_layers=2, bias=bias, bidirectional=True).double()
    again.load_state_dict({k: torch.as_tensor(v) for k, v in rnn_sd.items()})
    x = torch.as_tensor(np.random.default_rng(2).normal(size=(T, B, D)))
    np.testing.assert_allclose(again(x)[0].detach().numpy(), module(x)[0].detach().numpy(), rtol=1e-12, atol=1e-14)
