"""GRU and LSTM stacks (torch.nn.GRU / nn.LSTM + Linear): loss, outputs, final states (h_n, c_n) and exact
gradients (∂E/∂h0, ∂E/∂c0 included) against a per-sequence reference written from torch's equations, and
against central differences of that reference, in float64. No torch needed (tests/test_gated_torch_parity.py
adds torch autograd); bad input is refused before any work."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import gpubptt
from tests.reference import numeric, ref_gated_loss, ref_gated_stack_one

D, H, K, T, B = 3, 4, 5, 5, 3

STRUCTURES = list(itertools.product(["gru", "lstm"], [1, 2, 3], [False, True]))
# (bias, tokens, h0, lengths, reduction): every option on, every option off, and two mixes
VARIANTS = [
    (True, True, True, True, "mean"),
    (False, False, False, False, "sum"),
    (True, False, True, False, "sum"),
    (False, True, False, True, "mean"),
]


def build(cell, layers, bidirectional, bias, seed=0, dropout=0.0):
    model = gpubptt.RNN(
        D, H, K, cell=cell, num_layers=layers, bidirectional=bidirectional, bias=bias,
        backend="numpy", dtype="float64", init="torch", seed=seed, dropout=dropout,
    )  # fmt: skip
    if bias:  # torch's init, but every bias nonzero (b_hn included), so a misplaced bias shows
        rng = np.random.default_rng(seed + 100)
        for k in model.params:
            if model.params[k].ndim == 1:
                model.params[k] = rng.uniform(-0.5, 0.5, size=model.params[k].shape)
    return model


def inputs(rng, cell, tokens, h0, lengths, n_states):
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    h, c = (rng.normal(size=(n_states, B, H)) * 0.5, rng.normal(size=(n_states, B, H))) if h0 else (None, None)
    s0 = None if h is None else ((h, c) if cell == "lstm" else h)
    lens = np.array([T, 2, 0][:B]) if lengths else None
    return x, y, s0, h, c, lens


@pytest.mark.parametrize("cell,layers,bidirectional", STRUCTURES)
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_loss_outputs_and_final_states_match_the_reference(cell, layers, bidirectional, variant):
    bias, tokens, h0, lengths, reduction = VARIANTS[variant]
    model = build(cell, layers, bidirectional, bias, seed=variant)
    rng = np.random.default_rng(10 + variant)
    x, y, s0, h, c, lens = inputs(rng, cell, tokens, h0, lengths, model.num_states)
    p = {k: np.array(v) for k, v in model.params.items()}
    kw = dict(num_layers=layers, bidirectional=bidirectional)
    want = ref_gated_loss(cell, p, x, y, h, c, lens, reduction, **kw)
    np.testing.assert_allclose(float(model.loss(x, y, s0, lengths=lens, reduction=reduction)), want, rtol=1e-12)
    loss, grads, final = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction, return_final_state=True)
    np.testing.assert_allclose(float(loss), want, rtol=1e-12)
    out = model.forward(x, s0, lengths=lens)
    dirs = 2 if bidirectional else 1
    assert out.states.shape == (T, B, H * dirs)
    flat = s0 is None and model.num_states == 1
    h_n, c_n = final if cell == "lstm" else (final, None)
    assert h_n.shape == ((B, H) if flat else (model.num_states, B, H))
    assert grads["s0"].shape == h_n.shape
    assert ("c0" in grads) == (cell == "lstm")
    if cell == "lstm":
        assert c_n.shape == h_n.shape == grads["c0"].shape
        np.testing.assert_array_equal(out.final_state[1], c_n)
        np.testing.assert_array_equal(out.final_state[0], h_n)
    else:
        np.testing.assert_array_equal(out.final_state, h_n)
    for b in range(B):
        n = T if lens is None else lens[b]
        zero = np.zeros((model.num_states, H))
        hb, cb = (zero, zero) if h is None else (h[:, b], c[:, b])
        top, hs, cs = ref_gated_stack_one(cell, p, x[:n, b], hb, cb, layers, bidirectional)
        np.testing.assert_allclose(out.states[:n, b], top, rtol=1e-12, atol=1e-14)
        np.testing.assert_array_equal(out.states[n:, b], 0)  # padded steps: zero
        np.testing.assert_allclose(h_n[b] if flat else h_n[:, b], hs[0] if flat else hs, rtol=1e-12, atol=1e-14)
        if cell == "lstm":
            np.testing.assert_allclose(c_n[b] if flat else c_n[:, b], cs[0] if flat else cs, rtol=1e-12, atol=1e-14)


FD_STRUCTURES = [(c, l, bd) for c, l, bd in STRUCTURES if l < 3] + [("gru", 3, True), ("lstm", 3, False)]


@pytest.mark.parametrize("cell,layers,bidirectional", FD_STRUCTURES)
@pytest.mark.parametrize("variant", [0, 1])
def test_gradients_match_central_differences_of_the_reference(cell, layers, bidirectional, variant, blas, jit):
    bias, tokens, _, lengths, reduction = VARIANTS[variant]
    model = build(cell, layers, bidirectional, bias, seed=20 + variant)
    rng = np.random.default_rng(30 + variant)
    x, y, s0, h, c, lens = inputs(rng, cell, tokens, True, lengths, model.num_states)
    _, grads = model.loss_and_grads(x, y, s0, lengths=lens, reduction=reduction)
    p = {k: np.array(v) for k, v in model.params.items()}
    kw = dict(num_layers=layers, bidirectional=bidirectional)
    f = lambda: ref_gated_loss(cell, p, x, y, h, c, lens, reduction, **kw)  # noqa: E731
    arrays = [*p.items(), ("s0", h)] + ([("c0", c)] if cell == "lstm" else [])
    for name, arr in arrays:
        idx = rng.choice(arr.size, min(arr.size, 12), replace=False)  # a sample of each array's coordinates
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_parameter_names_and_shapes_follow_torchs_gate_stacking(cell):
    model = build(cell, 2, True, True)
    G = {"gru": 3, "lstm": 4}[cell]
    assert model.params["U"].shape == (G * H, D) and model.params["U_l1"].shape == (G * H, 2 * H)
    assert model.params["W_l1_reverse"].shape == (G * H, H) and model.params["b"].shape == (G * H,)
    assert ("b_hn_l1_reverse" in model.params) == (cell == "gru")
    assert model.hidden_size == H and model.cell_name == cell and model.nonlinearity is None
    assert f"cell={cell!r}" in repr(model)
    rnn_sd, lin_sd = model.to_torch()
    again = gpubptt.RNN.from_torch(rnn_sd, lin_sd, cell=cell, backend="numpy")
    copy = gpubptt.RNN.from_params(model.params, backend="numpy")  # the cell read from W's rows
    x = np.arange(T * B).reshape(T, B) % D
    for other in (again, copy, model.to("numpy")):
        assert other.cell_name == cell
        np.testing.assert_allclose(other.forward(x).probs, model.forward(x).probs, rtol=1e-12)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_dropout_gradients_are_exact_for_the_masks_drawn(cell):
    model = build(cell, 3, True, True, seed=5, dropout=0.4)
    rng = np.random.default_rng(5)
    x, y, s0, _, _, lens = inputs(rng, cell, False, True, True, model.num_states)
    report = gpubptt.gradcheck(model, x, y, s0, lengths=lens, max_coords=10, dropout_seed=7)
    # rounding, not a wrong gradient: the worst error grows as eps shrinks (LSTM: 1.2e-6 at eps 1e-4,
    # 5.9e-6 at 1e-5, 2e-4 at 1e-6), on coordinates whose gradient is near the relative floor
    assert max(report.errors.values()) < 2e-5, report


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_padded_steps_add_nothing_whatever_the_inputs_there(cell):
    model = build(cell, 2, True, True, seed=8)
    rng = np.random.default_rng(8)
    x, y, s0, _, _, lens = inputs(rng, cell, False, True, True, model.num_states)
    x2, y2 = x.copy(), y.copy()
    for b, n in enumerate(lens):
        x2[n:, b] = rng.normal(size=(T - n, D)) * 10
        y2[n:, b] = (y[n:, b] + 1) % K
    for truncate in (None, 2):
        l1, g1, f1 = model.loss_and_grads(x, y, s0, lengths=lens, return_final_state=True, truncate=truncate)
        l2, g2, f2 = model.loss_and_grads(x2, y2, s0, lengths=lens, return_final_state=True, truncate=truncate)
        np.testing.assert_allclose(float(l2), float(l1), rtol=1e-13)
        for k in g1:
            np.testing.assert_allclose(g2[k], g1[k], rtol=1e-12, atol=1e-15, err_msg=k)
        np.testing.assert_allclose(np.asarray(f2), np.asarray(f1), rtol=1e-13)


def test_the_elman_cell_keeps_its_names_and_refuses_what_it_always_did():
    model = gpubptt.RNN(D, H, K, backend="numpy", bias=True, seed=0)
    assert list(model.params) == ["U", "W", "V", "b", "c"] and model.nonlinearity == "tanh"
    assert model.cell_name == "rnn" and "cell=" not in repr(model)


LSTM_H0 = np.zeros((B, H))


@pytest.mark.parametrize(
    "cell,s0,err,fragment",
    [
        ("lstm", LSTM_H0, gpubptt.InputError, "an LSTM's s0 is the tuple (h0, c0)"),
        ("lstm", (LSTM_H0,), gpubptt.InputError, "got a tuple of 1"),
        ("lstm", (LSTM_H0, None), gpubptt.InputError, "an LSTM's s0 is the tuple (h0, c0)"),
        ("lstm", (LSTM_H0, np.zeros((B, H + 1))), gpubptt.ShapeError, "c0 must have the shape of h0, (3, 4)"),
        ("lstm", (LSTM_H0, np.full((B, H), np.nan)), gpubptt.InputError, "c0 contains NaN"),
        ("lstm", (LSTM_H0, np.zeros((B, H), dtype=int)), gpubptt.InputTypeError, "c0 must be floating point"),
        ("gru", (LSTM_H0, LSTM_H0), gpubptt.InputError, "only cell='lstm' has a tuple state"),
        ("rnn", (LSTM_H0, LSTM_H0), gpubptt.InputError, "only cell='lstm' has a tuple state"),
    ],
)
def test_bad_initial_states_are_refused(cell, s0, err, fragment):
    model = gpubptt.RNN(D, H, K, cell=cell, backend="numpy", seed=0)
    x = np.zeros((T, B), dtype=np.int64)
    for call in (lambda: model.loss_and_grads(x, x, s0), lambda: model.forward(x, s0)):
        with pytest.raises(err) as info:
            call()
        assert fragment in str(info.value)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_nonlinearity_is_refused_for_gated_cells(cell):
    with pytest.raises(gpubptt.InputError, match="nonlinearity applies to cell='rnn' only"):
        gpubptt.RNN(D, H, K, cell=cell, nonlinearity="tanh", backend="numpy")


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("bias,tokens", [(True, False), (False, True)])
def test_truncation_matches_full_bptt_on_windows(cell, bias, tokens, blas, jit):
    """truncate=k against an independent reference: Σ_t (G(a, t) − G(a, t − 1)), the exact gradients of
    windows a..t started from the forward's own states (``diagnostics.gated.truncated_gradients``)."""
    from gpubptt.diagnostics.gated import truncated_gradients

    model = build(cell, 1, False, bias, seed=40)
    rng = np.random.default_rng(40)
    x, y, s0, _, _, _ = inputs(rng, cell, tokens, True, False, 1)
    s0 = tuple(a[0] for a in s0) if cell == "lstm" else s0[0]  # (B, H)
    for k in (0, 1, 3):
        _, got = model.loss_and_grads(x, y, s0, truncate=k)
        want = truncated_gradients(model, x, y, k, s0)
        assert set(want) <= set(got)
        for name, w in want.items():
            np.testing.assert_allclose(got[name], w, rtol=1e-10, atol=1e-13, err_msg=f"{name} k={k}")
    _, full = model.loss_and_grads(x, y, s0)
    _, short = model.loss_and_grads(x, y, s0, truncate=1)
    assert not np.allclose(short["W"], full["W"])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("layers,bidirectional", [(2, True), (3, False)])
def test_truncation_lanes_covering_every_step_are_full_bptt_in_deep_stacks_with_lengths(cell, layers, bidirectional):
    """The lanes run (the model itself would switch to full BPTT for k ≥ T − 1): a window over every step
    must give full BPTT's gradients, through every layer, both directions and padded steps."""
    model = build(cell, layers, bidirectional, True, seed=41)
    rng = np.random.default_rng(41)
    x, y, s0, _, _, lens = inputs(rng, cell, False, True, True, model.num_states)
    _, full = model.loss_and_grads(x, y, s0, lengths=lens)
    batch = model._check(x, y, s0, lens, True)
    ws = gpubptt.engine.stack.Workspace(model, batch, T - 1, step_kernels="auto", chunk_elements=1 << 20)
    ws.load(batch)
    ws.run()
    for name in full:
        got = ws.grads[name].reshape(full[name].shape)
        np.testing.assert_allclose(got, full[name], rtol=1e-11, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("saved,loaded,rows", [("gru", "rnn", 12), ("lstm", "gru", 16), ("rnn", "lstm", 4)])
def test_a_state_dict_of_one_cell_loaded_as_another_is_refused_naming_the_rows(saved, loaded, rows):
    model = gpubptt.RNN(D, H, K, cell=saved, backend="numpy", bias=True, seed=0)
    rnn_sd, lin_sd = model.to_torch()
    with pytest.raises(gpubptt.ShapeError) as info:
        gpubptt.RNN.from_torch(rnn_sd, lin_sd, cell=loaded, backend="numpy")
    msg = str(info.value)
    assert f"weight_hh_l0 has {rows} rows for H = {H}" in msg and f"cell={saved!r}" in msg
    with pytest.raises(gpubptt.ShapeError, match=f"not the {loaded} cell's"):
        gpubptt.RNN.from_params(model.params, cell=loaded, backend="numpy")


def test_the_gru_and_the_lstm_recompute_exactly():
    """Recomputation keeps h at segment boundaries (enough for the GRU) and, for the LSTM, c as well."""
    rng = np.random.default_rng(42)
    gru = build("gru", 2, False, True, seed=42)
    x, y, s0, _, _, lens = inputs(rng, "gru", False, True, True, gru.num_states)
    _, want = gru.loss_and_grads(x, y, s0, lengths=lens)
    for c in (1, 2, "sqrt"):
        _, got = gru.loss_and_grads(x, y, s0, lengths=lens, recompute=c)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=f"{k} recompute={c}")
    lstm = build("lstm", 2, False, True, seed=42)  # once refused (c was not kept); now kept and carried
    x, y, s0, _, _, lens = inputs(rng, "lstm", False, True, True, lstm.num_states)
    _, want = lstm.loss_and_grads(x, y, s0, lengths=lens)
    for c in (1, 2, "sqrt"):
        _, got = lstm.loss_and_grads(x, y, s0, lengths=lens, recompute=c)
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-15, err_msg=f"{k} recompute={c}")
