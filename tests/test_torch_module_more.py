"""``gpubptt.torch.Recurrent`` beyond plain Parameters, against torch's own modules in float64: weights that a
parametrization or pruning computes, tied Parameters, ``torch.compile``; the refusals of a double backward, of
weights that cannot be shared, and of x in the caller's layout. Skipped without torch."""

from __future__ import annotations

import copy

import pytest

import gpubptt
from gpubptt.engine.pullback import PullbackError

torch = pytest.importorskip("torch")
gt = pytest.importorskip("gpubptt.torch")
prune = pytest.importorskip("torch.nn.utils.prune")
parametrizations = pytest.importorskip("torch.nn.utils.parametrizations")

D, H, T, B = 3, 4, 5, 2


def _loss_and_grads(mod, x):
    """A nonlinear loss on output and h_n; (output, h_n, ∂E/∂x, {name: ∂E/∂Parameter}) as torch autograd gives them."""
    x = x.clone().requires_grad_(True)
    for p in mod.parameters():
        p.grad = None
    out, state = mod(x)
    h_n = state[0] if isinstance(state, tuple) else state
    (torch.sin(out).sum() + (h_n**2).sum()).backward()
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in mod.named_parameters()}  # compiled
    return out.detach(), h_n.detach(), x.grad, grads


def _assert_same(ours, theirs, rtol=1e-9):
    """Outputs, final states and every gradient equal (float64), the Parameters matched by torch's names."""
    for a, b in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12)
    assert ours[3].keys() == theirs[3].keys()
    for name in ours[3]:
        torch.testing.assert_close(ours[3][name], theirs[3][name], rtol=rtol, atol=1e-12, msg=name)


@pytest.mark.parametrize("loss", ["linear", "nonlinear"])
@pytest.mark.parametrize("wrt", ["x", "h0", "weight_hh_l0"])
def test_a_double_backward_is_refused_where_torch_would_differentiate_the_gradient(loss, wrt):
    torch.manual_seed(0)
    mod = torch.nn.GRU(D, H).double()
    rec = gt.Recurrent.from_module(copy.deepcopy(mod))
    x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=wrt == "x")
    h0 = torch.randn(1, B, H, dtype=torch.float64, requires_grad=wrt == "h0")

    def first_order(m):
        """∂E/∂wrt with create_graph=True (the first half of a gradient penalty); the rest frozen."""
        m.requires_grad_(False)
        m.weight_hh_l0.requires_grad_(wrt == "weight_hh_l0")
        out, _ = m(x, h0)
        E = out.sum() if loss == "linear" else torch.sin(out).sum()
        return torch.autograd.grad(E, {"x": x, "h0": h0, "weight_hh_l0": m.weight_hh_l0}[wrt], create_graph=True)[0]

    # torch's own GRU: the gradient carries a graph, so a penalty on it can be differentiated
    g_torch = first_order(mod)
    assert g_torch.pow(2).sum().requires_grad
    # ours: the same first-order gradient, and a penalty that requires grad as torch's does (it came back
    # constant, silently adding nothing, where the loss was linear), but whose backward is refused
    g = first_order(rec)
    torch.testing.assert_close(g, g_torch.detach(), rtol=1e-9, atol=1e-12)
    penalty = g.pow(2).sum()
    assert penalty.requires_grad
    with pytest.raises(PullbackError, match="Recurrent's gradients are not themselves differentiable"):
        penalty.backward()


@pytest.mark.parametrize("change", ["weight_norm", "prune"])
def test_parametrized_and_pruned_weights_match_the_torch_module_changed_alike(change):
    torch.manual_seed(1)
    mod = torch.nn.GRU(D, H, num_layers=2, bidirectional=True).double()
    rec = gt.Recurrent.from_module(copy.deepcopy(mod))
    for m in (mod, rec):  # the same change to torch's module and to ours
        if change == "weight_norm":
            parametrizations.weight_norm(m, "weight_hh_l0")
            parametrizations.weight_norm(m, "weight_ih_l1_reverse")
        else:
            prune.l1_unstructured(m, "weight_hh_l0", amount=0.3)
            prune.l1_unstructured(m, "bias_ih_l1", amount=0.5)
    x = torch.randn(T, B, D, dtype=torch.float64)
    _assert_same(_loss_and_grads(rec, x), _loss_and_grads(mod, x))
    # an update of the Parameters underneath reaches the next call, as in torch
    with torch.no_grad():
        for m in (mod, rec):
            for p in m.parameters():
                p.mul_(1.1)
    _assert_same(_loss_and_grads(rec, x), _loss_and_grads(mod, x))


def test_weights_that_cannot_be_shared_are_refused_naming_them():
    x = torch.randn(T, B, D)
    pruned = torch.nn.GRU(D, H)
    prune.l1_unstructured(pruned, "weight_hh_l0", amount=0.3)
    with pytest.raises(gpubptt.InputTypeError, match=r"the GRU's weight_hh_l0 is pruned \(torch\.nn\.utils\.prune\), "):
        gt.Recurrent.from_module(pruned)
    normed = torch.nn.LSTM(D, H)
    parametrizations.weight_norm(normed, "weight_ih_l0")
    with pytest.raises(
        gpubptt.InputTypeError, match=r"the LSTM's weight_ih_l0 is parametrized .*remove_parametrizations"
    ):
        gt.Recurrent.from_module(normed)
    no_bias = torch.nn.RNN(D, H)
    no_bias.bias_ih_l0 = None
    with pytest.raises(gpubptt.InputTypeError, match="the RNN's bias_ih_l0 is None, not a Parameter"):
        gt.Recurrent.from_module(no_bias)
    rec = gt.Recurrent.from_module(torch.nn.GRU(D, H))
    rec.bias_hh_l0 = None
    with pytest.raises(gpubptt.InputTypeError, match="bias_hh_l0 is None, not a tensor"):
        rec(x)


def test_tied_parameters_match_torch_modules_tied_alike():
    torch.manual_seed(2)
    rnn = torch.nn.RNN(D, H, bidirectional=True).double()
    rnn.weight_hh_l0_reverse = rnn.weight_hh_l0  # one Parameter, two uses: its gradient is the sum of both
    lstm = torch.nn.LSTM(D, H, num_layers=2).double()
    lstm.weight_hh_l1 = lstm.weight_hh_l0
    gru = torch.nn.GRU(D, H).double()
    gru.bias_ih_l0 = gru.bias_hh_l0  # tied within one recurrence (the GRU keeps b_hn apart)
    x = torch.randn(T, B, D, dtype=torch.float64)
    for mod in (rnn, lstm, gru):
        rec = gt.Recurrent.from_module(copy.deepcopy(mod))  # deepcopy keeps the tie
        _assert_same(_loss_and_grads(rec, x), _loss_and_grads(mod, x))


def test_torch_compile_gives_the_outputs_and_gradients_of_the_uncompiled_module():
    torch.manual_seed(3)
    mod = torch.nn.LSTM(D, H, num_layers=2).double()
    rec = gt.Recurrent.from_module(copy.deepcopy(mod))
    compiled = torch.compile(rec, backend="eager")  # its first call is compiled: the model is built there
    for steps in (T, T + 2):
        x = torch.randn(steps, B, D, dtype=torch.float64)
        ours = _loss_and_grads(compiled, x)
        _assert_same(ours, _loss_and_grads(rec, x))
        _assert_same(ours, _loss_and_grads(mod, x))


def test_bad_x_is_refused_in_the_callers_layout_and_terms():
    torch.manual_seed(4)
    first = gt.Recurrent.from_module(torch.nn.GRU(D, H, batch_first=True))
    time = gt.Recurrent.from_module(torch.nn.GRU(D, H))
    feature = f"input.size(-1) must be equal to input_size: expected {D}, got 5 in "
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(B, 6, 5), torch.tensor([6, 2]), batch_first=True)
    for rec, x, message in [
        (first, torch.randn(B, 6, 5), feature + "x of shape (2, 6, 5) read as (B, T, D) with batch_first"),
        (time, torch.randn(6, B, 5), feature + "x of shape (6, 2, 5) read as (T, B, D)"),
        (first, torch.randn(6, 5), feature + "x of shape (6, 5) read as (T, D) unbatched"),
        (first, packed, feature + "the PackedSequence's data of shape (8, 5)"),
        (first, torch.randn(B, 0, D), "x of shape (2, 0, 3) read as (B, T, D) with batch_first has no time steps "
                                      "(T = 0): a sequence needs at least one step"),
        (time, torch.randn(0, B, D), "x of shape (0, 2, 3) read as (T, B, D) has no time steps (T = 0)"),
        (time, torch.randn(0, D), r"x of shape \(0, 3\) read as \(T, D\) unbatched has no time steps"),
        (first, torch.randn(0, T, D), "x of shape (0, 5, 3) read as (B, T, D) with batch_first is an empty batch "
                                      "(B = 0)"),
    ]:  # fmt: skip
        with pytest.raises(gpubptt.ShapeError) as info:
            rec(x)
        assert str(info.value).startswith(message.replace("\\", "")), str(info.value)
    with pytest.raises(gpubptt.ShapeError, match=r"x of shape \(2, 6, 5\) read as \(B, T, D\) with batch_first"):
        first(torch.randn(B, 6, 5), lengths=torch.tensor([6, 2]))


def test_hx_changed_in_place_before_backward_is_refused_as_torch_does():
    for mod in (torch.nn.LSTM(D, H), gt.Recurrent.from_module(torch.nn.LSTM(D, H))):  # torch's own module, ours
        h0, c0 = torch.zeros(1, B, H), torch.zeros(1, B, H)
        out, _ = mod(torch.randn(T, B, D, requires_grad=True), (h0, c0))
        c0.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize("cls", ["GRU", "LSTM"])
@pytest.mark.parametrize("change", ["parametrization", "new Parameter"])
def test_a_backward_uses_its_own_forwards_weights_not_a_later_forwards(cls, change):
    """Two forwards with different weights (a weight drawn afresh per call, or a Parameter replaced) before one
    backward: each output's gradient is taken with the weights it was computed with, as torch's modules do."""
    import torch.nn.utils.parametrize as P

    scale = {"now": 1.0}

    class Scaled(torch.nn.Module):
        def forward(self, W):
            return W * scale["now"]

    torch.manual_seed(1)
    x1, x2 = torch.randn(4, 3, 2, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    grads = {}
    for kind in ("torch", "gpubptt"):
        torch.manual_seed(0)
        m = getattr(torch.nn, cls)(2, 3).double()
        if kind == "gpubptt":
            m = gt.Recurrent.from_module(m)
        if change == "parametrization":
            P.register_parametrization(m, "weight_hh_l0", Scaled())
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        scale["now"] = 1.5
        o1 = m(a)[0]
        if change == "parametrization":
            scale["now"] = 0.5
            first = m.parametrizations.weight_hh_l0.original
        else:
            first = m.weight_hh_l0
            m.weight_hh_l0 = torch.nn.Parameter(first.detach() * 0.5)
        o2 = m(b)[0]
        (o1.pow(2).sum() + o2.pow(2).sum()).backward()
        grads[kind] = (first.grad.clone(), a.grad.clone(), b.grad.clone())
    for want, got in zip(grads["torch"], grads["gpubptt"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_backward_through_saved_copies_leaves_the_module_on_its_own_parameters():
    """A saved-tensors hook that hands back copies: the backward re-pointed the model at them under the live
    Parameters' identity, and later in-place updates no longer reached it."""
    torch.manual_seed(0)
    ref = torch.nn.RNN(3, 4, dtype=torch.float64)
    rec = gt.Recurrent.from_module(copy.deepcopy(ref))
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        out = rec(x)[0]
    old = rec.weight_hh_l0
    rec.weight_hh_l0 = torch.nn.Parameter(old.detach() * 0.5)
    rec(x)
    rec.weight_hh_l0 = old
    out.sum().backward()
    with torch.no_grad():
        for p in rec.parameters():
            p.add_(0.1)
        ref.load_state_dict(rec.state_dict())
        torch.testing.assert_close(rec(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)


def test_a_replaced_parameter_is_refused_by_its_torch_name():
    rec = gt.Recurrent.from_module(torch.nn.LSTM(3, 4, num_layers=2))
    x = torch.randn(5, 2, 3)
    rec(x)
    good = rec.weight_hh_l1
    rec.weight_hh_l1 = torch.nn.Parameter(torch.full((16, 4), float("inf")))
    with pytest.raises(gpubptt.InputError, match="weight_hh_l1 contains NaN or infinity"):
        rec(x)
    rec.weight_hh_l1 = torch.nn.Parameter(torch.randn(5, 5))
    with pytest.raises(gpubptt.ShapeError, match=r"weight_hh_l1 must have shape \(16, 4\), got \(5, 5\)"):
        rec(x)
    rec.weight_hh_l1 = good  # and it runs again once a good one is back
    assert rec(x)[0].shape == (5, 2, 4)


def test_torch_func_transforms_and_several_backwards_are_refused_in_a_torch_users_words():
    rec = gt.Recurrent.from_module(torch.nn.GRU(3, 4).double())
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(gpubptt.InputTypeError, match=r"torch\.func's transforms"):
        torch.func.grad(lambda xx: rec(xx)[0].sum())(x)
    with pytest.raises(PullbackError, match=r"torch\.autograd\.gradcheck"):
        torch.autograd.gradcheck(lambda xx: rec(xx)[0].sin().sum(), (x,))
    assert rec(x)[0].shape == (5, 2, 4)  # the module works on after both


def test_forward_mode_dual_tensors_are_refused_naming_them():
    import torch.autograd.forward_ad as fwAD

    rec = gt.Recurrent.from_module(torch.nn.LSTM(3, 4))
    x = torch.randn(5, 2, 3)
    with fwAD.dual_level():
        with pytest.raises(gpubptt.InputTypeError, match=r"forward-mode AD \(dual tensors\)"):
            rec(fwAD.make_dual(x, torch.ones_like(x)))
    assert rec(x)[0].shape == (5, 2, 4)
