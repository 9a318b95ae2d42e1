"""Against torch autograd in float64: nn.RNN(num_layers, bidirectional, nonlinearity, bias) + Linear +
cross-entropy, for every combination of layers 1–3 × directions × tanh/relu × bias × dense/tokens × h0 ×
lengths × reduction: loss, every gradient (under torch's names) and the final states h_n. Skipped
without torch (tests/test_deep.py checks the same math against a reference and finite differences)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt

torch = pytest.importorskip("torch")

D, H, K, T, B = 3, 4, 5, 6, 3
COMBOS = list(itertools.product([1, 2, 3], [False, True], ["tanh", "relu"], [False, True], [False, True],
                                [False, True], [False, True], ["sum", "mean"]))  # fmt: skip


def torch_run(rnn, lin, x, y, h0, lengths, reduction, tokens):
    xt = torch.nn.functional.one_hot(torch.as_tensor(x), D).double() if tokens else torch.as_tensor(x)
    h0t = None if h0 is None else torch.as_tensor(h0).requires_grad_(True)
    if lengths is None:
        out, h_n = rnn(xt, h0t)
        mask = torch.ones(T, B, dtype=torch.bool)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.as_tensor(lengths), enforce_sorted=False)
        out, h_n = rnn(packed, h0t)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
        mask = torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]
    logits = lin(out)[mask]
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)[mask], reduction=reduction)
    loss.backward()
    return loss, h_n, h0t


@pytest.mark.parametrize("layers,bidir,nonlinearity,bias,tokens,h0,lengths,reduction", COMBOS)
def test_matches_torch_autograd(layers, bidir, nonlinearity, bias, tokens, h0, lengths, reduction):
    torch.manual_seed(layers * 7 + bidir)
    rnn = torch.nn.RNN(D, H, num_layers=layers, nonlinearity=nonlinearity, bias=bias, bidirectional=bidir).double()
    dirs = 2 if bidir else 1
    lin = torch.nn.Linear(H * dirs, K, bias=bias).double()
    rng = np.random.default_rng(1)
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    s0 = rng.normal(size=(layers * dirs, B, H)) * 0.5 if h0 else None
    lens = np.array([T, 4, 1]) if lengths else None
    loss_t, h_n, h0t = torch_run(rnn, lin, x, y, s0, lens, reduction, tokens)
    model = gpubptt.RNN.from_torch(rnn.state_dict(), lin.state_dict(), nonlinearity=nonlinearity, backend="numpy")
    loss, grads, final = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction, return_final_state=True)
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-12)
    final = final.reshape(layers * dirs, B, H)
    np.testing.assert_allclose(final, h_n.detach().numpy(), rtol=1e-11, atol=1e-13)
    g_rnn, g_lin = model.to_torch(grads=grads)
    for name, param in [*rnn.named_parameters(), *(("lin." + k, v) for k, v in lin.named_parameters())]:
        ours = g_lin[name[4:]] if name.startswith("lin.") else g_rnn[name]
        np.testing.assert_allclose(ours, param.grad.numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    if h0:
        np.testing.assert_allclose(grads["s0"], h0t.grad.numpy(), rtol=1e-10, atol=1e-12)
