"""The cell diagnostics (``gpubptt.diagnostics.gated``, ``gpubptt vanish --cell``): the written-out step Jacobians
against central differences of the reference step, the window truncation against the engine's own truncation
(rnn), the product norms against dense products, and the command's output and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.cli import app
from gpubptt.diagnostics import gated, truncation_bias
from tests.reference import ref_gated_step

D, H, T, B = 3, 4, 6, 2
runner = CliRunner()


def model_of(cell, seed=0):
    model = gpubptt.RNN(D, H, D, cell=cell, backend="numpy", dtype="float64", init="torch", bias=True, seed=seed)
    rng = np.random.default_rng(seed + 50)
    for k in model.params:  # nonzero biases, b_hn included
        if model.params[k].ndim == 1:
            model.params[k] = rng.uniform(-0.5, 0.5, size=model.params[k].shape)
    return model


def _step(cell, p, x_t, s):
    """The reference step on the whole state: s = h, or [h, c] for the LSTM."""
    if cell == "rnn":
        return np.tanh(p["U"] @ x_t + p["W"] @ s + p["b"])
    h, c = (s[:H], s[H:]) if cell == "lstm" else (s, None)
    h2, c2 = ref_gated_step(cell, p, 0, 0, x_t, h, c)
    return np.concatenate([h2, c2]) if cell == "lstm" else h2


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_step_jacobians_match_central_differences_of_the_reference_step(cell):
    model = model_of(cell)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(T, B, D))
    J, fwd = gated.step_jacobians(model, x)
    p = {k: np.array(v) for k, v in model.params.items()}
    n = 2 * H if cell == "lstm" else H
    assert J.shape == (T, B, n, n)
    for t in (0, T - 1):
        for b in range(B):
            s = fwd["S"][t, b] if cell != "lstm" else np.concatenate([fwd["S"][t, b], fwd["C"][t, b]])
            num = np.empty((n, n))
            for j in range(n):
                e = np.zeros(n)
                e[j] = 1e-6
                num[:, j] = (_step(cell, p, x[t, b], s + e) - _step(cell, p, x[t, b], s - e)) / 2e-6
            np.testing.assert_allclose(J[t, b], num, rtol=1e-6, atol=1e-9)


def test_window_truncation_equals_the_engines_tutorial_truncation_for_the_rnn_cell():
    model = model_of("rnn", seed=3)
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, D, size=(T, B)), rng.integers(0, D, size=(T, B))
    rel, cos = gated.truncation_windows(model, x, y, [0, 1, 3, T - 1])
    want = truncation_bias(model, x, y, truncates=[0, 1, 3, T - 1])
    np.testing.assert_allclose(rel, want.rel_error, rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(cos, want.cosine, rtol=1e-12)
    assert rel[-1] < 1e-12 and rel[0] > 1e-3  # the full window is BPTT; a window of one step is not


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_cell_flow_matches_dense_products_and_full_window_truncation_is_exact(cell):
    model = model_of(cell, seed=4)
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, D, size=(T, B)), rng.integers(0, D, size=(T, B))
    flow = gated.cell_flow(model, x, y, truncates=[0, 2, T - 1])
    J, _ = gated.step_jacobians(model, x)
    n = J.shape[-1]
    for ell in (1, 3, T):
        P = np.broadcast_to(np.eye(n), (B, n, n))
        for j in range(T - 1, T - 1 - ell, -1):
            P = P @ J[j]
        want = np.mean(np.log(np.linalg.norm(P, ord=2, axis=(1, 2))))
        np.testing.assert_allclose(flow.log_norms[ell], want, rtol=1e-10)
        if cell == "lstm":
            cw = np.mean(np.log(np.linalg.norm(P[:, H:, H:], ord=2, axis=(1, 2))))
            np.testing.assert_allclose(flow.cell_log_norms[ell], cw, rtol=1e-10)
    assert flow.rel_error[-1] < 1e-12 and flow.rel_error[0] > flow.rel_error[1] > flow.rel_error[-1]
    # ∂E/∂s0 of the whole state from the Jacobians agrees with BPTT's ∂E/∂h0 (and ∂E/∂c0)
    _, g = model.loss_and_grads(x, y, (np.zeros((B, H)),) * 2 if cell == "lstm" else np.zeros((B, H)))
    both = np.concatenate([g["s0"], g["c0"]], axis=1) if cell == "lstm" else g["s0"]
    np.testing.assert_allclose(flow.s0_norm, np.linalg.norm(both), rtol=1e-10)


def test_vanish_cell_prints_one_row_per_cell_and_json(tmp_path):
    args = ["vanish", "--cell", "rnn,lstm", "--seq-len", "8", "--hidden", "6", "--batch", "2", "--vocab", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["cell", "params", "horizon"] and [ln.split()[0] for ln in lines[1:]] == [
        "rnn", "lstm",
    ]  # fmt: skip
    js = runner.invoke(app, [*args, "--format", "json"])
    data = json.loads(js.stdout)
    assert [c["cell"] for c in data["cells"]] == ["rnn", "lstm"] and data["settings"]["matched"] == "H"
    assert data["cells"][0]["cell_log_norms"] is None and len(data["cells"][1]["cell_log_norms"]) == 9


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--cell", "transformer"], "must be one or more of rnn, gru, lstm"),
        (["--cell", "gru,gru"], "each once"),
        (["--cell", "gru", "--scale", "0.5"], "--scale does not apply with --cell"),
        (["--cell", "gru", "--iters", "3"], "--iters 3 does not apply with --cell"),
        (["--cell", "gru", "--dtype", "float32"], "--dtype float32 does not apply with --cell"),
        (["--cell", "lstm", "--hidden", "2048", "--seq-len", "200", "--batch", "8"], "(step Jacobians"),
    ],
)
def test_vanish_cell_refuses_what_does_not_apply(extra, message):
    result = runner.invoke(app, ["vanish", *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_the_cell_diagnostics_take_one_layer():
    model = gpubptt.RNN(D, H, D, cell="gru", num_layers=2, backend="numpy")
    with pytest.raises(gpubptt.InputError, match="one layer and one direction"):
        gated.step_jacobians(model, np.zeros((T, B), dtype=np.int64))


def test_vanish_measures_a_gated_checkpoint_with_the_cell_table(tmp_path):
    ck = tmp_path / "ck.npz"
    train = ["train", "--cell", "lstm", "--task", "recall", "--delay", "4", "--hidden", "8", "--batch", "4",
             "--steps", "3", "--backend", "numpy", "--checkpoint", str(ck)]  # fmt: skip
    assert runner.invoke(app, train).exit_code == 0
    result = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--batch", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    cells = json.loads(result.stdout)["cells"]
    assert [c["cell"] for c in cells] == ["lstm"] and len(cells[0]["log_norms"]) == 7  # T = delay + 2, lags 0..T
    bad = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--scale", "0.5"])
    assert bad.exit_code == 2 and "this checkpoint holds a lstm" in bad.output
    bad = runner.invoke(app, ["vanish", "--checkpoint", str(ck), "--iters", "3"])
    assert bad.exit_code == 2 and "--iters 3 does not apply to a lstm checkpoint" in bad.output


def test_the_cell_measures_refuse_what_cannot_fit_before_any_work():
    from gpubptt.engine.memory import InsufficientMemoryError

    with pytest.raises(InsufficientMemoryError, match=r"step Jacobians"):  # in the library, not only the CLI
        gated.compare_cells(["rnn", "lstm"], 200, 2048, 8, 5)
