"""More gradient-flow diagnostics against independent references: the layout they read, relu products that
are exactly 0, the smallest truncation window of the cell table, and refusals named before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt import diagnostics as dg
from gpubptt.cli import app
from gpubptt.diagnostics import gated
from gpubptt.diagnostics.stack import with_radius
from tests.reference import dphi, ref_forward_one, ref_tutorial_truncated_grads

runner = CliRunner()


def host(model):
    return {k: gpubptt.to_numpy(v).astype(np.float64) for k, v in model.params.items()}


def ref_rel_errors(p, x, y, ks):
    """‖g_full − g_k‖ / ‖g_full‖ over U, W, V from the tutorial reference (no biases), for each k."""
    flat = lambda g: np.concatenate([g[n].ravel() for n in ("U", "W", "V")])  # noqa: E731
    full = flat(ref_tutorial_truncated_grads(p, x, y, truncate=y.shape[0]))
    return np.array([np.linalg.norm(full - flat(ref_tutorial_truncated_grads(p, x, y, k))) for k in ks]) / (
        np.linalg.norm(full)
    )


# -- 1. one layout: time-major, the per-step softmax loss -----------------------------------------
def test_truncation_bias_of_a_batch_first_model_matches_the_time_major_tutorial_reference():
    rng = np.random.default_rng(0)
    T, B = 6, 3
    model = gpubptt.RNN(4, 5, 4, backend="numpy", dtype="float64", seed=0, bias=False)
    x, y = rng.integers(0, 4, (T, B)), rng.integers(0, 4, (T, B))
    r = dg.with_spectral_radius(model, 0.7)
    want = ref_rel_errors(host(r), x, y, range(T))
    assert want[2] > 0.01  # windows 2..4 are biased: a wrong layout had given 0 there
    for batch_first, head in [(True, "softmax"), (False, "last_softmax"), (True, "mse")]:
        r.batch_first, r.head = batch_first, head
        np.testing.assert_allclose(dg.truncation_bias(r, x, y).rel_error, want, rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(dg.vanish_report(r, x, y).truncation.rel_error, want, rtol=1e-9, atol=1e-14)
    # the sweep's rows, the model as it is and a rescaled copy, read the batch the same way
    p = host(r)
    rescaled = dict(p, W=p["W"] * 0.4 / np.abs(np.linalg.eigvals(p["W"])).max())
    sweep = dg.vanish_sweep(r, x, y, [None, 0.4])
    np.testing.assert_allclose(sweep[0][1].truncation.rel_error, want, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(
        sweep[1][1].truncation.rel_error, ref_rel_errors(rescaled, x, y, range(T)), rtol=1e-9, atol=1e-14
    )


# -- 2. relu products that are exactly 0 ----------------------------------------------------------
def relu_case():
    """Example 0 reads token 1 at step 2, whose large negative U column turns every unit off: from there its
    products are exactly 0; example 1 never does, and its products grow by about 1.05 per step."""
    H = 3
    p = {"U": np.array([[1.0, -5, 1]] * H), "W": np.eye(H) * 0.9 + 0.05, "V": np.ones((3, H)) * 0.1}
    model = gpubptt.RNN.from_params(p, backend="numpy", dtype="float64", nonlinearity="relu")
    x = np.zeros((8, 2), dtype=np.int64)
    x[2, 0] = 1
    return model, p, x


def ref_geo_mean_log_norms(p, x):
    """log of the geometric mean over the batch of ‖J_end ⋯ J_{end−ℓ+1}‖₂, J_j = diag(1[s_j > 0]) W, dense."""
    T, B = x.shape
    logs = np.zeros((T, B))
    for b in range(B):
        S = ref_forward_one(p, x[:, b], np.zeros(p["W"].shape[0]), "relu")
        P = np.eye(p["W"].shape[0])
        for ell in range(1, T):
            j = T - ell  # step j of lag ℓ: s_j = S[j]
            P = P @ (np.diag(dphi(S[j], "relu")) @ p["W"])
            with np.errstate(divide="ignore"):
                logs[ell, b] = np.log(np.linalg.norm(P, 2))
    return logs.mean(axis=1)


def test_relu_products_that_are_exactly_zero_stay_out_of_the_fitted_rate():
    model, p, x = relu_case()
    log_mean = ref_geo_mean_log_norms(p, x)
    ok = np.isfinite(log_mean) & (np.arange(len(log_mean)) >= 1)
    assert 2 <= ok.sum() < len(log_mean) - 1  # some lags are exactly 0, and some are not
    want_rate = np.exp(np.polyfit(np.flatnonzero(ok), log_mean[ok], 1)[0])
    jp = dg.jacobian_products(model, x)
    np.testing.assert_allclose(jp.decay_rate, want_rate, rtol=1e-6)  # about 1.05 (was 5e-182)
    np.testing.assert_allclose(jp.norms, np.exp(log_mean), rtol=1e-4, atol=0)  # power iteration, tol 1e-5
    assert jp.horizon == np.flatnonzero(np.exp(log_mean) < jp.threshold)[0]
    assert jp.horizon_fit is None  # the finite lags grow: no extrapolated horizon
    np.testing.assert_allclose(gated.cell_flow(model, x, np.zeros_like(x), truncates=[]).decay_rate, want_rate)
    json.dumps(jp.to_dict(), allow_nan=False)


def test_vanish_cli_rate_of_a_relu_model_is_not_zero():
    args = ["vanish", "--seq-len", "10", "--hidden", "2", "--vocab", "4", "--batch", "2", "--scale", "0.5,1",
            "--nonlinearity", "relu", "--seed", "1", "--backend", "numpy"]  # fmt: skip
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    for scale in json.loads(result.stdout)["scales"]:
        rate = scale["products"]["decay_rate"]
        assert rate is None or rate > 0.1  # each dead step had counted as log 1e-308: a rate of 0.0000


def test_products_through_a_relu_stack_leave_zero_lags_out_of_the_fit():
    # token 1 lights layer 0's unit 2 alone, whose large negative weight into the top layer turns every top unit
    # off at that step: example 0's top products are exactly 0 from the lag that reaches step 2 on
    H = 3
    p = {
        "U": np.array([[1.0, 0, 1], [1, 0, 1], [0, 10, 0]]), "W": np.diag([0.5, 0.5, 0.0]),
        "U_l1": np.array([[1.0, 1, -50]] * H), "W_l1": np.eye(H) * 0.9 + 0.05, "V": np.ones((3, H)) * 0.1,
    }  # fmt: skip
    model = gpubptt.RNN.from_params(p, backend="numpy", dtype="float64", nonlinearity="relu")
    _, _, x = relu_case()
    rep = dg.stack_report(model, x, np.zeros_like(x))
    top_own, top_through = rep.recurrences[1].own, rep.through_stack.per_layer[1]
    assert np.any(top_through.norms == 0) and np.sum(top_through.norms[1:] > 0) >= 2
    # the top layer's past is reached through its own W only: the two measures coincide, on the finite lags
    np.testing.assert_allclose(top_through.norms, top_own.norms, rtol=1e-4)
    assert top_own.decay_rate > 0.5  # was ~1e-100 and below: each dead step counted as log 1e-308
    np.testing.assert_allclose(top_through.decay_rate, top_own.decay_rate, rtol=1e-4)


# -- 3. the cell table's truncate@1%: the smallest window of all -----------------------------------
def torch_rel_errors(cell, p, x, y):
    """‖g_full − g_k‖ / ‖g_full‖ over every parameter for k = 0..T−1, tutorial truncation by torch autograd:
    E_t through steps max(0, t − k)..t from the (fixed) full-forward state before them."""
    torch = pytest.importorskip("torch")
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in p.items()}
    T, B = x.shape
    X = torch.nn.functional.one_hot(torch.tensor(x), P["U"].shape[1]).double()

    def step(t, s):
        a = X[t] @ P["U"].T + P["b"]
        return torch.relu(a + s * P["w"]) if cell == "indrnn" else torch.tanh(a + s @ P["W"].T)

    def loss(s, t):
        return torch.nn.functional.cross_entropy(s @ P["V"].T + P["c"], torch.tensor(y[t]), reduction="sum")

    with torch.no_grad():
        S = [torch.zeros(B, P["U"].shape[0], dtype=torch.float64)]
        for t in range(T):
            S.append(step(t, S[-1]))

    def grads(k):
        E = 0.0
        for t in range(T):
            a = max(0, t - k)
            s = S[a]
            for j in range(a, t + 1):
                s = step(j, s)
            E = E + loss(s, t)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(E, list(P.values()))]).numpy()

    full = grads(T)
    return np.array([np.linalg.norm(grads(k) - full) / np.linalg.norm(full) for k in range(T)])


@pytest.mark.parametrize("cell,seed", [("rnn", 0), ("indrnn", 1)])
def test_cell_table_truncate_is_the_smallest_window_of_every_k(cell, seed):
    T, H, B, vocab = 12, 6, 2, 5
    rng = np.random.default_rng(seed)  # as compare_cells draws them
    x, y = rng.integers(0, vocab, size=(T, B)), rng.integers(0, vocab, size=(T, B))
    model = gpubptt.RNN(vocab, H, vocab, cell=cell, backend="numpy", dtype="float64", init="torch", seed=seed)
    rel = torch_rel_errors(cell, host(model), x, y)
    want = int(np.flatnonzero(rel < 0.01)[0])
    assert want not in (0, 1, 2, 4, 8, T - 1)  # between the measured windows: the old column gave the next one
    flow = gated.cell_flow(model, x, y)
    assert flow.smallest_truncate == want
    np.testing.assert_allclose(flow.rel_error, rel[flow.truncate], rtol=1e-8, atol=1e-13)
    args = ["vanish", "--cell", cell, "--seq-len", str(T), "--hidden", str(H), "--batch", str(B), "--vocab",
            str(vocab), "--seed", str(seed)]  # fmt: skip
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    row = next(line for line in table.stdout.splitlines() if line.split()[0] == cell)
    assert row.split()[-1] == str(want)
    js = runner.invoke(app, [*args, "--format", "json"])
    assert json.loads(js.stdout)["cells"][0]["smallest_truncate"] == want


# -- 4–6. refusals, named before any work ---------------------------------------------------------
@pytest.mark.parametrize("cell", ["gru", "lstm", "indrnn"])
def test_sweeps_refuse_other_cells_by_name(cell):
    x = np.zeros((4, 2), dtype=np.int64)
    one = gpubptt.RNN(3, 4, 3, cell=cell, backend="numpy", dtype="float64", seed=0)
    two = gpubptt.RNN(3, 4, 3, cell=cell, num_layers=2, backend="numpy", dtype="float64", seed=0)
    calls = {
        "vanish_sweep": lambda: dg.vanish_sweep(one, x, x, [0.5]),
        "with_spectral_radius": lambda: dg.with_spectral_radius(one, 0.5),
        "with_radius": lambda: with_radius(two, 0.5),
        "stack_sweep": lambda: dg.stack_sweep(two, x, x, [0.5]),
    }
    for name, call in calls.items():
        with pytest.raises(gpubptt.InputError, match=rf"^{name} reads the rnn cell's W \(H, H\).*'{cell}'"):
            call()


@pytest.mark.parametrize("x", [np.zeros(5, dtype=np.int64), 3, None])
def test_cell_flow_checks_x_before_reading_its_sizes(x):
    model = gpubptt.RNN(4, 3, 4, cell="gru", backend="numpy", dtype="float64", seed=0)
    with pytest.raises(gpubptt.ShapeError, match=r"x must be token ids \(T, B\) or dense inputs \(T, B, 4\)"):
        gated.cell_flow(model, x, np.zeros((5, 2), dtype=np.int64))


def test_cell_flow_reads_x_time_major_whatever_batch_first_says():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, (7, 2)), rng.integers(0, 4, (7, 2))
    model = gpubptt.RNN(4, 3, 4, cell="gru", backend="numpy", dtype="float64", seed=0)
    want = gated.cell_flow(model, x, y)
    model.batch_first = True
    got = gated.cell_flow(model, x, y)
    np.testing.assert_array_equal(got.rel_error, want.rel_error)
    np.testing.assert_array_equal(got.log_norms, want.log_norms)


def test_gated_stacks_are_refused_as_not_measured():
    x = np.zeros((4, 2), dtype=np.int64)
    gru2 = gpubptt.RNN(3, 4, 3, cell="gru", num_layers=2, backend="numpy", dtype="float64", seed=0)
    with pytest.raises(gpubptt.InputError, match=r"one layer and one direction only.*stacks of gru cells are not"):
        gated.cell_flow(gru2, x, x)
    with pytest.raises(gpubptt.InputError, match="stacks of other cells are not measured"):
        dg.stack_report(gru2, x, x)


def test_vanish_refuses_a_gated_stack_checkpoint_before_any_output(tmp_path):
    ck = tmp_path / "lstm2.npz"
    train = ["train", "--cell", "lstm", "--layers", "2", "--task", "recall", "--delay", "2", "--hidden", "4",
             "--batch", "2", "--steps", "1", "--backend", "numpy", "--checkpoint", str(ck)]  # fmt: skip
    assert runner.invoke(app, train).exit_code == 0
    result = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--batch", "2"])
    assert result.exit_code == 2
    assert "lstm2.npz holds a lstm model of 2 layers" in result.output
    assert "one layer and one direction" in result.output
    assert "vanish:" not in result.output and result.stdout.count("\n") <= 1


def test_vanish_refuses_dtype_for_a_gated_checkpoint(tmp_path):
    ck = tmp_path / "gru.npz"
    train = ["train", "--cell", "gru", "--task", "recall", "--delay", "2", "--hidden", "4", "--batch", "2",
             "--steps", "1", "--backend", "numpy", "--checkpoint", str(ck)]  # fmt: skip
    assert runner.invoke(app, train).exit_code == 0
    result = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--dtype", "float32"])
    assert result.exit_code == 2 and "--dtype float32 does not apply to a gru checkpoint" in result.output
    assert runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--batch", "2"]).exit_code == 0


@pytest.mark.parametrize("arch", [{"num_layers": 2}, {"bidirectional": True}])
def test_with_spectral_radius_refuses_a_stack_instead_of_rescaling_its_first_w(arch):
    """It rescaled W alone: W_l1 and W_reverse kept their radius without a word."""
    from gpubptt import diagnostics as dg

    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0, **arch)
    with pytest.raises(gpubptt.InputError, match=r"with_spectral_radius rescales one recurrence's W.*stack_sweep"):
        dg.with_spectral_radius(model, 0.5)


def test_truncation_bias_takes_an_lstms_state_as_the_pair_loss_and_grads_takes():
    from gpubptt import diagnostics as dg
    from gpubptt.diagnostics import gated

    lstm = gpubptt.RNN(3, 4, 3, cell="lstm", backend="numpy", dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 3, (5, 2)), rng.integers(0, 3, (5, 2))
    h0, c0 = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    report = dg.truncation_bias(lstm, x, y, (h0, c0), truncates=[1])
    ref = gated.truncated_gradients(lstm, x, y, 1, (h0, c0))  # an independent path: windows of full BPTT
    _, full = lstm.loss_and_grads(x, y, (h0, c0))
    want = np.linalg.norm(full["c0"] - ref["c0"]) / np.linalg.norm(full["c0"])
    np.testing.assert_allclose(report.by_param["c0"][0], want, rtol=1e-10)


@pytest.mark.parametrize(
    "call",
    [
        lambda dg, g, m, x, y: dg.truncation_bias(m, x, y, truncates=3),
        lambda dg, g, m, x, y: dg.vanish_sweep(m, x, y, 0.5),
        lambda dg, g, m, x, y: g.cell_flow(m, x, y, truncates=2),
        lambda dg, g, m, x, y: g.truncated_gradients(m, x, y, -1),
        lambda dg, g, m, x, y: g.truncated_gradients(m, x, y, 1.5),
        lambda dg, g, m, x, y: g.truncation_windows(m, x, y, [-2]),
    ],
)
def test_diagnostic_windows_and_radii_of_the_wrong_kind_are_refused_by_name(call):
    from gpubptt import diagnostics as dg
    from gpubptt.diagnostics import gated

    model = gpubptt.RNN(3, 4, 3, backend="numpy", dtype="float64", seed=0)
    x = np.zeros((4, 2), dtype=np.int64)
    with pytest.raises((gpubptt.InputError, gpubptt.InputTypeError), match=r"truncates|radii|truncate|k must"):
        call(dg, gated, model, x, x)
