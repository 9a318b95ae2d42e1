"""The IndRNN cell (``gpubptt.cells.indrnn``): exact gradients against central differences and against an Elman
model with W = diag(w), its kernels' CUDA bodies, its constraint, its refusals and its diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.backend import get_backend
from gpubptt.cells import IndRNNCell, indrnn
from gpubptt.cli import app
from tests.reference import central_differences
from tests.test_gated_kernels import run_body

D, H, K, T, B = 5, 4, 5, 6, 3


def _model(phi="relu", bias=True, seed=0, **kw):
    return gpubptt.RNN(D, H, K, cell="indrnn", nonlinearity=phi, backend="numpy", dtype="float64", bias=bias,
                       seed=seed, **kw)  # fmt: skip


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


@pytest.mark.parametrize("phi", ["relu", "tanh"])
def test_indrnn_gradients_match_central_differences(phi):
    rng = np.random.default_rng(1)
    model = _model(phi)
    model.params["U"] = rng.normal(size=(H, D))  # pre-activations away from relu's kink
    x, y = rng.integers(0, D, (T, B)), rng.integers(0, K, (T, B))
    s0 = rng.uniform(0.1, 1, (B, H))
    lengths = np.array([T, T - 2, 1])
    _, grads = model.loss_and_grads(x, y, s0, lengths=lengths)
    want = central_differences(model, x, y, s0, lengths)
    for k in model.params:
        assert _rel(grads[k], want[k]) <= 1e-7, k


def _as_elman(model):
    """The Elman model with W = diag(w) for every recurrence, the same U, b, V, c: the same function."""
    params = {}
    for k, v in model.params.items():
        if k.startswith("w"):
            params["W" + k[1:]] = np.diag(v)
        else:
            params[k] = v
    return gpubptt.RNN.from_params(params, backend="numpy", dtype="float64", cell="rnn",
                                   nonlinearity=model.nonlinearity)  # fmt: skip


@pytest.mark.parametrize("phi", ["relu", "tanh"])
@pytest.mark.parametrize("arch", [dict(), dict(num_layers=2, bidirectional=True)])
@pytest.mark.parametrize("truncate", [None, 2])
def test_indrnn_equals_elman_with_diagonal_w_to_rounding(phi, arch, truncate):
    rng = np.random.default_rng(2)
    model = _model(phi, seed=3, **arch)
    elman = _as_elman(model)
    x = rng.normal(size=(T, B, D))
    y = rng.integers(0, K, (T, B))
    n = model.num_states
    s0 = rng.uniform(-1, 1, (n, B, H)) if n > 1 else rng.uniform(-1, 1, (B, H))
    lengths = np.array([T, 3, 0])
    loss, grads = model.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate)
    loss_e, grads_e = elman.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate)
    assert abs(loss - loss_e) <= 1e-12 * abs(loss_e)
    for k, g in grads.items():
        want = np.diagonal(grads_e["W" + k[1:]]) if k.startswith("w") else grads_e[k]
        assert _rel(g, want) <= 1e-12, k
    out, out_e = model.forward(x, s0, lengths=lengths), elman.forward(x, s0, lengths=lengths)
    assert _rel(out.final_state, out_e.final_state) <= 1e-12


def test_indrnn_step_jacobian_is_diagonal_and_is_the_elman_one_of_diag_w():
    rng = np.random.default_rng(4)
    model = _model("tanh")
    S = np.tanh(rng.normal(size=(T + 1, B, H)))
    w = np.asarray(model.params["w"])
    J = model.cell.step_jacobian({"w": w}, S, {})
    J_e = gpubptt.cells.ElmanCell("tanh").step_jacobian({"W": np.diag(w)}, S, {})
    np.testing.assert_allclose(J, J_e, rtol=0, atol=1e-15)
    assert np.count_nonzero(J - J * np.eye(H)) == 0


@pytest.mark.parametrize("phi", ["relu", "tanh"])
def test_indrnn_kernel_bodies_compute_what_the_numpy_twins_do(phi):
    rng = np.random.default_rng(5)
    k = indrnn.kernels(get_backend("numpy"))
    pre, sprev, w = rng.normal(size=(B, H)), rng.normal(size=(B, H)), rng.normal(size=H)
    pre[0, 0] = np.nan  # stays NaN through φ, as in NumPy (CUDA's max would give relu 0)
    want = np.empty((B, H))
    (k.forward_tanh if phi == "tanh" else k.forward_relu)(pre, w, sprev, want)
    got = np.empty((B, H))
    wb = np.broadcast_to(w, (B, H)).copy()  # CuPy broadcasts w (H,) over the rows; the interpreter is flat
    body = indrnn._FORWARD_TANH if phi == "tanh" else indrnn._FORWARD_RELU
    run_body(body, {"pre": (pre, False), "w": (wb, False), "sprev": (sprev, False), "out": (got, False)},
             {"max": np.fmax})  # fmt: skip  # CUDA's max is fmax: a NaN argument gives the other one
    np.testing.assert_allclose(got, want, rtol=1e-14)
    dnext, g = rng.normal(size=(B, H)), rng.normal(size=(B, H))
    s = want
    want_g = g.copy()
    (k.backward_tanh if phi == "tanh" else k.backward_relu)(dnext, w, s, want_g, np.empty((B, H)))
    got_g = g.copy()
    body = indrnn._BACKWARD_TANH if phi == "tanh" else indrnn._BACKWARD_RELU
    run_body(body, {"dnext": (dnext, False), "w": (wb, False), "s": (s, False), "g": (got_g, False)}, {})
    np.testing.assert_allclose(got_g, want_g, rtol=1e-14)


def test_indrnn_init_and_the_gradient_horizon_constraint_hold_through_training():
    bound = indrnn.horizon_bound(50, 2.0)  # 2^(1/50) ≈ 1.014
    cell = IndRNNCell("relu", max_weight=bound)
    model = gpubptt.RNN(D, H, K, cell=cell, backend="numpy", dtype="float64", seed=0)
    w = np.asarray(model.params["w"])
    assert (w >= 0).all() and (w <= 1).all()
    model.params["w"] = np.full(H, 5.0)
    model.constrain()
    np.testing.assert_array_equal(model.params["w"], np.full(H, bound))
    assert IndRNNCell("relu", max_weight=bound) == cell and IndRNNCell("tanh") != cell
    with pytest.raises(gpubptt.InputError, match="max_weight must be None or a finite number > 0"):
        IndRNNCell("relu", max_weight=-1.0)


def test_indrnn_torch_interchange_is_refused_clearly():
    model = _model()
    with pytest.raises(gpubptt.InputError, match="cell 'indrnn' has no torch module"):
        model.to_torch()
    with pytest.raises(gpubptt.InputError, match="cell 'indrnn' has no torch module"):
        gpubptt.RNN.from_torch({}, {}, cell="indrnn")


def test_indrnn_checkpoint_keeps_its_options(tmp_path):
    from gpubptt.training.record import load_checkpoint, save_checkpoint

    cell = IndRNNCell("tanh", max_weight=1.01)
    model = gpubptt.RNN(D, H, K, cell=cell, backend="numpy", dtype="float64", seed=0, bias=True)
    save_checkpoint(tmp_path / "ck.npz", model)
    back = load_checkpoint(tmp_path / "ck.npz", backend="numpy").model
    assert back.cell == cell and back.config == model.config
    for k in model.params:
        np.testing.assert_array_equal(back.params[k], model.params[k])


def test_vanish_cell_indrnn_prints_its_row_beside_the_others():
    result = CliRunner().invoke(app, ["vanish", "--cell", "rnn,indrnn", "--seq-len", "12", "--hidden", "8",
                                      "--batch", "4", "--format", "json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    cells = json.loads(result.stdout)["cells"]
    assert [c["cell"] for c in cells] == ["rnn", "indrnn"]
    assert cells[1]["parameters"] < cells[0]["parameters"]  # w (H,) for W (H, H)


@pytest.mark.gpu
@pytest.mark.parametrize("phi", ["relu", "tanh"])
def test_indrnn_cupy_float64_matches_numpy(cupy_be, phi):
    be = cupy_be
    rng = np.random.default_rng(7)
    ref = gpubptt.RNN(20, 32, 7, cell="indrnn", nonlinearity=phi, num_layers=2, bidirectional=True, backend="numpy",
                      dtype="float64", bias=True, seed=4)  # fmt: skip
    gpu = ref.to(be)
    assert gpu.cell == ref.cell
    for tokens, truncate in ((True, None), (False, 3)):
        x = rng.integers(0, 20, size=(12, 6)) if tokens else rng.normal(size=(12, 6, 20))
        y, s0 = rng.integers(0, 7, size=(12, 6)), rng.normal(size=(4, 6, 32)) * 0.3
        lengths = np.array([12, 5, 0, 1, 12, 7])
        l1, g1 = ref.loss_and_grads(x, y, s0, lengths=lengths, truncate=truncate)
        l2, g2 = gpu.loss_and_grads(be.asarray(x), be.asarray(y), be.asarray(s0), lengths=be.asarray(lengths),
                                    truncate=truncate)  # fmt: skip
        assert float(l2) == pytest.approx(float(l1), rel=1e-12)
        for k in g1:
            np.testing.assert_allclose(gpubptt.to_numpy(g2[k]), g1[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_readme_indrnn_example_runs():
    from gpubptt.cells.indrnn import horizon_bound

    ind = gpubptt.RNN(64, 128, 64, cell="indrnn", num_layers=2, bidirectional=True, bias=True, backend="numpy")
    assert ind.params["w"].shape == (128,) and ind.params["U"].shape == (128, 64) and ind.params["b"].shape == (128,)
    cell = IndRNNCell("relu", max_weight=horizon_bound(100, 2.0))
    bounded = gpubptt.RNN(64, 128, 64, cell=cell, backend="numpy")
    assert float(np.abs(bounded.params["w"]).max()) <= 2 ** (1 / 100)


def test_elman_only_diagnostics_refuse_indrnn_naming_the_any_cell_measures():
    from gpubptt import diagnostics

    model = _model()
    x = np.zeros((4, 2), dtype=np.int64)
    for fn in (diagnostics.step_gradients, diagnostics.stack_report):
        with pytest.raises(gpubptt.InputError, match=r"this model's cell is 'indrnn': gpubptt\.diagnostics\.gated"):
            fn(model, x, x)


def test_vanish_checkpoint_measures_an_indrnn_checkpoint_as_its_own_cell(tmp_path):
    from gpubptt.training.run import new_run, save_run

    run = new_run({"cell": "indrnn", "hidden": 8, "batch": 2, "chunk": 8, "task": "recall", "delay": 4},
                  backend="numpy", steps=1)  # fmt: skip
    path = save_run(tmp_path / "ind.npz", run)
    result = CliRunner().invoke(app, ["vanish", "--checkpoint", str(path), "--dtype", "float64", "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    (flow,) = json.loads(result.stdout)["cells"]
    assert flow["cell"] == "indrnn" and flow["hidden_size"] == 8


def test_indrnn_trains_resumes_and_benches_from_the_command_line(tmp_path):
    runner = CliRunner()
    ck = str(tmp_path / "ck.npz")
    common = ["--backend", "numpy", "--checkpoint", ck]
    args = ["train", "--cell", "indrnn", "--task", "recall", "--delay", "4", "--hidden", "8", "--batch", "4"]
    result = runner.invoke(app, [*args, "--steps", "2", *common])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", "--steps", "3", *common])
    assert result.exit_code == 0, result.output
    from gpubptt.training.record import load_checkpoint

    back = load_checkpoint(ck, backend="numpy")
    assert back.model.cell == IndRNNCell("relu") and back.state.step == 3  # the cell's own default φ
    bench = ["bench", "--cell", "indrnn", "--backend", "numpy", "--seq-lens", "4", "--hidden-sizes", "6",
             "--repeats", "1", "--format", "json"]  # fmt: skip
    result = runner.invoke(app, bench)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*bench, "--compare", "torch"])
    assert result.exit_code == 2 and "torch has no module for --cell indrnn" in result.output


def test_training_with_an_optimizer_built_on_the_parameter_mapping_keeps_the_bound():
    # an optimizer on model.params (not the model) passes train's check: it trained past max_weight (|w| 0.79 > 0.5)
    from gpubptt.training.data import TextData, default_corpus
    from gpubptt.training.loop import TrainConfig, train
    from gpubptt.training.optim import make_optimizer

    data = TextData(default_corpus())
    cell = IndRNNCell("relu", max_weight=0.5)
    model = gpubptt.RNN(data.input_size, 8, data.output_size, cell=cell, seed=0, backend="numpy")
    opt = make_optimizer("adam", model.params, lr=0.1)
    train(model, data, opt, TrainConfig(steps=5, batch_size=4, chunk=8, eval_every=0))
    w = np.abs(np.asarray(model.params["w"]))
    assert w.max() <= 0.5 and np.isclose(w.max(), 0.5)  # lr 0.1 drives w onto the bound, and no further


@pytest.mark.parametrize("bound", [np.float32(0.75), np.float16(0.5), np.int64(1), 2])
def test_max_weight_takes_numpy_and_python_numbers(bound):
    cell = IndRNNCell("relu", max_weight=bound)
    assert type(cell.max_weight) is float and cell.max_weight == float(bound)


@pytest.mark.parametrize("bound", [np.float32("nan"), True, np.bool_(True), "1", 10**400, 0, -1.0])
def test_max_weight_refuses_what_is_not_a_finite_positive_number(bound):
    with pytest.raises(gpubptt.InputError, match="max_weight must be None or a finite number > 0"):
        IndRNNCell("relu", max_weight=bound)


def test_horizon_bound_is_the_closed_form_and_checks_its_arguments():
    assert indrnn.horizon_bound(np.int64(100), np.float32(2.0)) == pytest.approx(2.0 ** (1 / 100), rel=1e-15)
    for T in (0, -5, 2.5, True, "10"):
        with pytest.raises(gpubptt.InputError, match="T must be an int ≥ 1"):
            indrnn.horizon_bound(T)
    for gamma in (-2.0, 0.0, float("inf"), float("nan"), "2"):
        with pytest.raises(gpubptt.InputError, match="gamma must be a finite number > 0"):
            indrnn.horizon_bound(100, gamma)
