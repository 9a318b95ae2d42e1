"""Output heads (``gpubptt.heads``) against torch autograd in float64: loss and every gradient of
nn.RNN/GRU/LSTM + nn.Linear under per-step softmax, last-step softmax, per-step and last-step MSE,
with and without lengths and a second direction; ``forward``'s logits; ``batch_first``; head errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt

D, H, K, T, B = 3, 4, 5, 6, 3
LENS = np.array([6, 2, 4])


def _model(cell, bidir, layers=2, seed=0):
    return gpubptt.RNN(
        D, H, K, cell=cell, num_layers=layers, bidirectional=bidir, bias=True, backend="numpy", dtype="float64",
        seed=seed, init="torch",
    )  # fmt: skip


def _torch_modules(torch, model):
    rnn_sd, lin_sd = model.to_torch()
    cls = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[model.cell_name]
    m = cls(D, H, num_layers=model.num_layers, bidirectional=model.bidirectional, bias=True).double()
    m.load_state_dict({k: torch.as_tensor(v) for k, v in rnn_sd.items()})
    lin = torch.nn.Linear(H * model.num_directions, K).double()
    lin.load_state_dict({k: torch.as_tensor(v) for k, v in lin_sd.items()})
    return m, lin


def _targets(head, rng):
    return {
        "softmax": rng.integers(0, K, size=(T, B)),
        "last_softmax": rng.integers(0, K, size=B),
        "mse": rng.normal(size=(T, B, K)),
        "last_mse": rng.normal(size=(B, K)),
    }[head]


def _torch_loss(torch, m, lin, x, y, head, lengths, reduction):
    F = torch.nn.functional
    if lengths is None:
        out, state = m(x)
        mask = torch.ones(T, B, dtype=torch.bool)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False)
        out, state = m(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=T)
        mask = torch.arange(T)[:, None] < torch.as_tensor(lengths)[None, :]
    h_n = state[0] if isinstance(state, tuple) else state
    y = torch.as_tensor(y)
    if head in ("softmax", "mse"):
        z = lin(out)[mask]
        if head == "softmax":
            return F.cross_entropy(z, y[mask], reduction=reduction)
        return F.mse_loss(z, y[mask], reduction=reduction)
    dirs = 2 if m.bidirectional else 1
    last = torch.cat([h_n[-dirs + d] for d in range(dirs)], dim=1)  # the top layer's h_n: [forward, reverse]
    z = lin(last)
    if head == "last_softmax":
        return F.cross_entropy(z, y, reduction=reduction)
    return F.mse_loss(z, y, reduction=reduction)


@pytest.mark.parametrize(
    "head,cell,bidir,lengths,reduction",
    [
        (h, c, bi, ln, red)
        for (h, c, bi, ln), red in zip(
            itertools.product(
                ["last_softmax", "mse", "last_mse", "softmax"], ["rnn", "gru", "lstm"], [False, True], [False, True]
            ),
            itertools.cycle(["sum", "mean", "mean"]),
        )
    ],
)
def test_head_loss_and_grads_match_torch_autograd(head, cell, bidir, lengths, reduction):
    torch = pytest.importorskip("torch")
    model = _model(cell, bidir, seed=len(head) + ord(cell[0]))
    m, lin = _torch_modules(torch, model)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(T, B, D)), _targets(head, rng)
    lens = LENS if lengths else None
    loss, grads = model.loss_and_grads(x, y, lengths=lens, reduction=reduction, head=head)
    ref = _torch_loss(torch, m, lin, torch.as_tensor(x), y, head, lens, reduction)
    ref.backward()
    assert abs(float(loss) - ref.item()) <= 1e-12 * abs(ref.item())
    assert abs(float(model.loss(x, y, lengths=lens, reduction=reduction, head=head)) - ref.item()) <= 1e-12 * abs(
        ref.item()
    )
    rnn_g, lin_g = model.to_torch(grads)
    for name, p in [*m.named_parameters(), *lin.named_parameters()]:
        ours = rnn_g[name] if name in rnn_g else lin_g[name]
        assert np.abs(ours - p.grad.numpy()).max() <= 1e-9 * np.abs(p.grad.numpy()).max(), name
    assert set(grads) == set(model.params) | {"s0"} | ({"c0"} if cell == "lstm" else set())


def test_forward_logits_are_the_torch_linear_of_the_outputs_and_probs_their_softmax():
    torch = pytest.importorskip("torch")
    model = _model("gru", True)
    m, lin = _torch_modules(torch, model)
    x = np.random.default_rng(0).normal(size=(T, B, D))
    out = model.forward(x)
    z = lin(m(torch.as_tensor(x))[0]).detach().numpy()
    np.testing.assert_allclose(out.logits, z, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.probs, torch.softmax(torch.as_tensor(z), -1).numpy(), rtol=1e-12, atol=1e-14)
    last = model.forward(x, head="last_mse")
    assert last.logits.shape == (B, K) and last.probs is None
    model.head = None
    bare = model.forward(x)
    assert bare.logits is None and bare.probs is None
    np.testing.assert_allclose(bare.states, out.states)


@pytest.mark.parametrize("head", ["softmax", "mse", "last_softmax"])
def test_batch_first_equals_time_major_on_swapped_axes(head):
    model = _model("lstm", True, seed=2)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(T, B, D)), _targets(head, rng)
    loss, grads = model.loss_and_grads(x, y, lengths=LENS, head=head)
    out = model.forward(x, lengths=LENS)
    model.batch_first = True
    yb = y.swapaxes(0, 1) if head in ("softmax", "mse") else y
    loss_b, grads_b = model.loss_and_grads(x.swapaxes(0, 1).copy(), yb.copy(), lengths=LENS, head=head)
    out_b = model.forward(x.swapaxes(0, 1), lengths=LENS)
    assert float(loss_b) == pytest.approx(float(loss), rel=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads_b[k], grads[k], rtol=1e-12, atol=1e-14)
    assert out_b.states.shape == (B, T, 2 * H) and out_b.probs.shape == (B, T, K)
    np.testing.assert_allclose(out_b.states, out.states.swapaxes(0, 1))
    np.testing.assert_allclose(out_b.logits, out.logits.swapaxes(0, 1))
    o, pb = model.vjp(x.swapaxes(0, 1), lengths=LENS)
    assert o.states.shape == (B, T, 2 * H)
    assert pb(np.ones((B, T, 2 * H)))["x"].shape == (B, T, D)


def test_heads_refuse_bad_targets_and_options():
    model = _model("rnn", False)
    x = np.zeros((T, B, D))
    with pytest.raises(gpubptt.ShapeError, match=r"labels y of shape \(B,\) = \(3,\)"):
        model.loss_and_grads(x, np.zeros((T, B), dtype=int), head="last_softmax")
    with pytest.raises(gpubptt.InputError, match=r"\[0, 5\)"):
        model.loss_and_grads(x, np.full(B, K), head="last_softmax")
    with pytest.raises(gpubptt.InputTypeError, match="float targets"):
        model.loss_and_grads(x, np.zeros((T, B, K), dtype=int), head="mse")
    with pytest.raises(gpubptt.InputError, match="length ≥ 1"):
        model.loss_and_grads(x, np.zeros((B, K)), lengths=np.array([T, 0, 1]), head="last_mse")
    with pytest.raises(gpubptt.InputError, match="truncate"):
        model.loss_and_grads(x, np.zeros((B, K)), truncate=2, head="last_mse")
    with pytest.raises(gpubptt.InputError, match="unknown head 'xent'"):
        model.loss_and_grads(x, np.zeros((T, B), dtype=int), head="xent")
    model.head = None
    with pytest.raises(gpubptt.InputError, match="no output head"):
        model.loss(x, np.zeros((T, B), dtype=int))


@pytest.mark.parametrize("setting", [("head", "last_softmax"), ("head", "mse"), ("batch_first", True)])
def test_train_and_evaluate_refuse_a_model_their_batches_do_not_fit(setting):
    """A non-softmax head died in evaluate on a raw NumPy error; batch_first trained on transposed batches."""
    from gpubptt.training.data import CopyTask
    from gpubptt.training.loop import TrainConfig, evaluate, train
    from gpubptt.training.optim import make_optimizer

    task = CopyTask(symbols=4, length=1, delay=4)
    model = gpubptt.RNN(task.input_size, 4, task.output_size, backend="numpy", seed=0)
    setattr(model, *setting)
    opt = make_optimizer("adam", model)
    before = {k: v.copy() for k, v in model.params.items()}
    name = setting[0]
    with pytest.raises(gpubptt.InputError, match=rf"train\(\) .*model\.{name}"):
        train(model, task, opt, TrainConfig(steps=2, batch_size=3, chunk=None, eval_every=2))
    with pytest.raises(gpubptt.InputError, match=rf"evaluate\(\) .*model\.{name}"):
        evaluate(model, task)
    assert opt.t == 0 and all(np.array_equal(v, before[k]) for k, v in model.params.items())


@pytest.mark.parametrize("head", ["softmax", "mse"])
def test_a_target_shape_error_under_batch_first_names_the_callers_layout(head):
    model = gpubptt.RNN(3, 4, 2, backend="numpy", dtype="float64", seed=0)
    model.batch_first = True
    x = np.zeros((3, 5, 3))  # (B, T, D)
    y = np.zeros((5, 3, 2)) if head == "mse" else np.zeros((5, 3), dtype=np.int64)  # time-major by mistake
    want = r"with batch_first, targets y must have shape \(B, T, …\) = \(3, 5, …\)"
    with pytest.raises(gpubptt.ShapeError, match=want):
        model.loss_and_grads(x, y, head=head)
    with pytest.raises(gpubptt.ShapeError, match=want):
        model.loss_and_grads(x.tolist(), y.tolist(), head=head)  # lists, as arrays


def test_data_parallel_names_dropout_not_a_seed_under_another_head():
    from gpubptt.distributed import DataParallel, LocalCommunicator

    model = gpubptt.RNN(3, 4, 2, num_layers=2, dropout=0.2, backend="numpy", dtype="float64", seed=0)
    model.head = "last_mse"
    dp = DataParallel(model, LocalCommunicator(), batch_size=3)
    with pytest.raises(gpubptt.InputError, match=r"dropout=0\.2 between layers runs under the 'softmax' head only"):
        dp.loss_and_grads(np.zeros((4, 3, 3)), np.zeros((3, 2)))
