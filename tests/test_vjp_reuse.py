"""``model.vjp`` reuses the forward buffers of a finished pullback for the next call of the same shape: each
call's results equal those of a model that never reused anything (a fresh copy), bit for bit, whatever the
previous call left in the buffers (other lengths, another s0, another cell state); results already handed
out stay as they were; pullbacks still outstanding keep their own buffers."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import gpubptt
from gpubptt.engine.pullback import PullbackError

D, H, T, B = 3, 4, 6, 3


def _model(cell: str, layers: int, bidir: bool) -> gpubptt.RNN:
    return gpubptt.RNN(D, H, 5, cell=cell, num_layers=layers, bidirectional=bidir, backend="numpy",
                       dtype="float64", seed=7)  # fmt: skip


def _call(model, seed, lengths=None, recompute=None):
    """One vjp + pullback under a random upstream gradient: (states, final, grads), all host copies."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, D))
    s0 = rng.standard_normal((model.num_states, B, H))
    s0 = (s0, rng.standard_normal(s0.shape)) if model.cell.extra_state else s0
    out, pullback = model.vjp(x, s0, lengths=lengths, recompute=recompute)
    d_states = rng.standard_normal(out.states.shape)
    finals = out.final_state if isinstance(out.final_state, tuple) else (out.final_state,)
    d_final = tuple(rng.standard_normal(f.shape) for f in finals)
    grads = pullback(d_states, d_final if len(d_final) > 1 else d_final[0])
    return out.states, finals, grads


def _same(a, b) -> None:
    states_a, finals_a, g_a = a
    states_b, finals_b, g_b = b
    np.testing.assert_array_equal(states_a, states_b)
    for fa, fb in zip(finals_a, finals_b, strict=True):
        np.testing.assert_array_equal(fa, fb)
    assert g_a.keys() == g_b.keys()
    for k in g_a:
        np.testing.assert_array_equal(g_a[k], g_b[k], err_msg=k)


@pytest.mark.parametrize(
    "cell,layers,bidir,recompute",
    [("rnn", 1, False, None), ("lstm", 2, True, None), ("gru", 2, False, None), ("lstm", 1, False, 2),
     ("rnn", 2, False, "sqrt")],
)  # fmt: skip
def test_each_call_on_reused_buffers_equals_a_fresh_model(cell, layers, bidir, recompute):
    model = _model(cell, layers, bidir)
    calls = [(1, np.array([6, 2, 0])), (2, None), (3, np.array([1, 6, 4])), (4, None)]
    kept = []
    for seed, lengths in calls:
        fresh = copy.deepcopy(model)  # never reused a buffer
        got = _call(model, seed, lengths, recompute)
        assert model._spares, "the finished pullback gave its buffers back"
        _same(got, _call(fresh, seed, lengths, recompute))
        kept.append((got, copy.deepcopy(got)))
    for got, snapshot in kept:  # what earlier calls handed out is untouched by the later ones
        _same(got, snapshot)


def test_pullbacks_outstanding_at_once_keep_their_own_buffers():
    model = _model("lstm", 1, False)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((T, B, D)) for _ in range(3)]
    _call(model, 9)  # leaves a spare set for the first of the next calls to take
    outs = [model.vjp(x) for x in xs]
    ups = [rng.standard_normal(o.states.shape) for o, _ in outs]
    got = [pb(u) for (_, pb), u in zip(reversed(outs), reversed(ups), strict=True)][::-1]  # backward last first
    for x, u, g in zip(xs, ups, got, strict=True):
        _, pb = copy.deepcopy(model).vjp(x)
        ref = pb(u)
        for k in ref:
            np.testing.assert_array_equal(g[k], ref[k], err_msg=k)


def test_a_released_pullback_gives_its_buffers_back_and_cannot_be_called():
    model = _model("gru", 1, False)
    x = np.random.default_rng(1).standard_normal((T, B, D))
    out, pb = model.vjp(x)
    pb.release()
    assert len(model._spares) == 1
    with pytest.raises(PullbackError, match="already called"):
        pb(np.ones_like(out.states))
    pb.release()  # a second release does nothing
    model.head = "mse"
    y = np.zeros((T, B, 5))
    loss = model.loss(x, y)  # a head's loss without gradients releases its pullback too
    assert np.isfinite(float(loss)) and len(model._spares) == 1


def test_buffers_given_back_on_one_stream_are_not_reused_on_another(monkeypatch):
    model = _model("rnn", 1, False)
    x = np.random.default_rng(2).standard_normal((T, B, D))
    placement = [(0, 111)]  # as CuPy reports (device, stream): the host backend made to look like a GPU's
    monkeypatch.setattr(type(model.backend), "placement", lambda self: placement[0])
    out, pb = model.vjp(x)
    stack = pb._stack
    pb(np.ones_like(out.states))
    placement[0] = (0, 222)  # another stream: its work could overtake what the first one still runs
    _, pb2 = model.vjp(x)
    assert pb2._stack is not stack
    pb2.release()
    placement[0] = (0, 111)
    _, pb3 = model.vjp(x)
    assert pb3._stack is stack  # back on the first stream: its set is reused


def test_buffers_go_back_under_the_stream_their_backward_ran_on(monkeypatch):
    model = _model("rnn", 1, False)
    x = np.random.default_rng(3).standard_normal((T, B, D))
    placement = [(0, 111)]
    monkeypatch.setattr(type(model.backend), "placement", lambda self: placement[0])
    out, pb = model.vjp(x)  # forward queued on stream 111
    stack = pb._stack
    placement[0] = (0, 222)
    pb(np.ones_like(out.states))  # backward queued on stream 222: the buffers are in use there until it runs
    placement[0] = (0, 111)
    _, pb2 = model.vjp(x)
    assert pb2._stack is not stack  # stream 111 could overtake the backward still queued on 222
    pb2.release()
    placement[0] = (0, 222)
    _, pb3 = model.vjp(x)
    assert pb3._stack is stack
