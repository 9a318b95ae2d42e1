"""The gated cells' compiled step kernels (numba, the ``jit`` extra) and the choice ``GPUBPTT_JIT``.

The kernels are checked one step at a time against independent float64 references: the forward against the
gate equations written out (σ(x) = 1 / (1 + e^−x)), the backward against central differences of that reference
step. Whole models run the gated gradient tests with and without them (the ``jit`` fixture in conftest.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpubptt
from gpubptt import InputError
from gpubptt.backend import get_backend
from gpubptt.cells import _jit, gru, lstm
from gpubptt.errors import BackendUnavailableError
from tests.reference import numeric_grad

B, H = 3, 5


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def lstm_step(a, cprev):
    """h, c, gates [i, f, g, o] of one LSTM step from its gate arguments a = pre + hw (B, 4H)."""
    i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H : 2 * H]), sigmoid(a[:, 3 * H :])
    g = np.tanh(a[:, 2 * H : 3 * H])
    c = f * cprev + i * g
    return o * np.tanh(c), c, np.concatenate([i, f, g, o], axis=1)


def gru_step(pre, hw, bn, hprev):
    """h and [r, z, n, m] of one GRU step."""
    r, z = sigmoid(pre[:, :H] + hw[:, :H]), sigmoid(pre[:, H : 2 * H] + hw[:, H : 2 * H])
    m = hw[:, 2 * H :] + bn
    n = np.tanh(pre[:, 2 * H :] + r * m)
    return (1 - z) * n + z * hprev, np.concatenate([r, z, n, m], axis=1)


@pytest.fixture
def compiled_kernels():
    """LSTM and GRU kernels of the NumPy backend with numba's compiled twins (skips where numba is absent)."""
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    be = get_backend("numpy")
    out = []
    for cell in (lstm, gru):
        k = cell._Kernels(be)
        k.jit = _jit.compile_kernels(*cell.JIT_KERNELS, choice="numba")
        out.append(k)
    return out


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 1e-5)])
def test_compiled_forward_steps_match_the_gate_equations(compiled_kernels, dtype, rtol):
    kl, kg = compiled_kernels
    rng = np.random.default_rng(0)
    pre, hw = rng.normal(size=(2, B, 4 * H)) * 2
    cprev, hprev = rng.normal(size=(2, B, H))
    h, c, A = np.empty((B, H), dtype), np.empty((B, H), dtype), np.empty((B, 4 * H), dtype)
    kl.forward(pre.astype(dtype), hw.astype(dtype), cprev.astype(dtype), h, c, A, np.empty((2, B, H), dtype))
    want_h, want_c, want_A = lstm_step(pre + hw, cprev)
    for got, want in ((h, want_h), (c, want_c), (A, want_A)):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)
    # GRU, on strided views (the layout of a time slice of a larger buffer): columns 1.. of wider arrays
    pre3, hw3, bn = pre[:, : 3 * H], hw[:, : 3 * H], rng.normal(size=H)
    wide = np.zeros((B, 4 * H + 1), dtype)
    A = np.empty((B, 4 * H), dtype)
    wide[:, 1 : 1 + H] = hprev
    kg.forward(pre3.astype(dtype), hw3.astype(dtype), bn.astype(dtype), wide[:, 1 : 1 + H], h, A, None)
    want_h, want_A = gru_step(pre3, hw3, bn, hprev)
    np.testing.assert_allclose(h, want_h, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(A, want_A, rtol=rtol, atol=rtol)


def test_compiled_lstm_backward_step_matches_central_differences(compiled_kernels):
    """E = ⟨g + dhn, h_t⟩ + ⟨dc, c_t⟩: the kernel's ∂a_t and dc_t ⊙ f_t are ∂E/∂a and ∂E/∂c_{t−1}."""
    kl, _ = compiled_kernels
    rng = np.random.default_rng(1)
    a, (cprev, g, dhn, dc) = rng.normal(size=(B, 4 * H)), rng.normal(size=(4, B, H))
    h, c, A = np.empty((B, H)), np.empty((B, H)), np.empty((B, 4 * H))
    kl.forward(a, np.zeros_like(a), cprev, h, c, A, np.empty((2, B, H)))

    def energy():
        h_, c_, _ = lstm_step(a, cprev)
        return float(np.sum((g + dhn) * h_) + np.sum(dc * c_))

    want_da, want_dc = numeric_grad(energy, a), numeric_grad(energy, cprev)
    da, dc_out = np.empty((B, 4 * H)), dc.copy()
    kl.backward(g.copy(), dhn, cprev, c, A, dc_out, da, np.empty((2, B, H)))
    np.testing.assert_allclose(da, want_da, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dc_out, want_dc, rtol=1e-7, atol=1e-9)


def test_compiled_gru_backward_step_matches_central_differences(compiled_kernels):
    """E = ⟨g + carry, h_t⟩: ∂E/∂pre, ∂E/∂hw and the direct ∂E/∂h_{t−1} (hw held fixed)."""
    _, kg = compiled_kernels
    rng = np.random.default_rng(2)
    pre, hw = rng.normal(size=(2, B, 3 * H))
    bn, (hprev, g, carry) = rng.normal(size=H), rng.normal(size=(3, B, H))
    h, A = np.empty((B, H)), np.empty((B, 4 * H))
    kg.forward(pre, hw, bn, hprev, h, A, None)

    def energy():
        return float(np.sum((g + carry) * gru_step(pre, hw, bn, hprev)[0]))

    dpre, dw, tmp = np.empty((B, 3 * H)), np.empty((B, 3 * H)), np.empty((3, B, H))
    kg.backward(g.copy(), hprev, A, carry, dpre, dw, tmp)
    np.testing.assert_allclose(dpre, numeric_grad(energy, pre), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(dw, numeric_grad(energy, hw), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(tmp[0], numeric_grad(energy, hprev), rtol=1e-7, atol=1e-9)


def _force_compiled_loops(monkeypatch, *, split_min_state: int) -> None:
    """The gated cells' whole compiled step loops forced on at a small shape (numba, MKL, every GEMM packed), batch
    halves from ``split_min_state`` = B·H; skips without numba or MKL."""
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from gpubptt.backend import _mkl, numpy_backend
    from gpubptt.cells import _loops

    if _mkl.load_mkl()[0] is None:
        pytest.skip("MKL unavailable: pip install mkl")
    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 1)
    monkeypatch.setattr(numpy_backend, "PACK_MIN_ROWS", 1)
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", split_min_state)


@pytest.mark.parametrize("dtype,rtol,atol", [("float64", 1e-6, 1e-8), ("float32", 2e-3, 2e-4)])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_whole_step_loops_under_mkl_match_central_differences_of_the_reference(cell, dtype, rtol, atol, split,
                                                                               monkeypatch):  # fmt: skip
    """Under MKL with compiled kernels, each (half's) GRU or LSTM step loop runs as one compiled call (GEMMs on the
    packed W, VML's tanh): forced on at a small shape (thresholds lowered), one loop or two batch halves, two
    layers; the gradients against float64 central differences of the reference."""
    from gpubptt.backend import numpy_backend
    from tests.reference import numeric, ref_gated_loss

    _force_compiled_loops(monkeypatch, split_min_state=2 if split else 1 << 40)
    used = []
    kind = {"gru": gru, "lstm": lstm}[cell]._Kernels
    step_loops = kind.step_loops
    monkeypatch.setattr(kind, "step_loops", lambda *a: used.append(step_loops(*a)) or used[-1])
    be = numpy_backend.NumpyBackend(blas="mkl")
    be.blas_threads.most = max(2, be.blas_threads.most)
    T, B, D, K, layers = 4, 5, 3, 4, 2
    model = gpubptt.RNN(D, H, K, cell=cell, num_layers=layers, bias=True, backend=be, seed=7, dtype=dtype,
                        init="torch")  # fmt: skip
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    h0, c0 = rng.normal(size=(2, layers, B, H)) * 0.5
    s0 = (h0.astype(dtype), c0.astype(dtype)) if cell == "lstm" else h0.astype(dtype)
    loss, grads = model.loss_and_grads(x.astype(dtype), y, s0)
    halves = 2 if split else 1
    assert len(used) == 2 * layers * halves and all(u is not None for u in used)  # every step loop ran compiled
    p = {k: np.array(v, dtype=np.float64) for k, v in model.params.items()}
    f = lambda: ref_gated_loss(cell, p, x, y, h0, c0, np.full(B, T), "sum", num_layers=layers)  # noqa: E731
    assert loss == pytest.approx(f(), rel=rtol)
    for name, arr in [*p.items(), ("s0", h0)] + ([("c0", c0)] if cell == "lstm" else []):
        idx = rng.choice(arr.size, min(arr.size, 8), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=rtol, atol=atol,
                                   err_msg=name)  # fmt: skip


def test_jit_choice_reads_the_variable_and_refuses_a_bad_value(monkeypatch):
    monkeypatch.setenv(_jit.JIT_VAR, " NumPy ")
    assert _jit.jit_in_use() == "numpy"
    assert _jit.compile_kernels(*lstm.JIT_KERNELS) is None
    monkeypatch.setenv(_jit.JIT_VAR, "llvm")
    with pytest.raises(
        InputError, match=r"GPUBPTT_JIT='llvm' is not a step-kernel choice; expected one of auto, numba"
    ):
        _jit.jit_in_use()
    with pytest.raises(InputError, match=r"jit=3 is not a step-kernel choice"):
        _jit.jit_in_use(3)
    monkeypatch.delenv(_jit.JIT_VAR)
    want = "numpy" if _jit._numba()[0] is None else "numba"
    assert _jit.jit_in_use() == want  # auto: numba where it imports


def test_without_numba_auto_runs_the_numpy_twins_and_numba_is_refused(monkeypatch):
    monkeypatch.setattr(_jit, "_numba", lambda: (None, "ModuleNotFoundError: No module named 'numba'"))
    assert _jit.jit_in_use("auto") == "numpy"
    assert lstm._Kernels(get_backend("numpy")).jit is None
    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    with pytest.raises(
        BackendUnavailableError,
        match=r"GPUBPTT_JIT=numba .* No module named 'numba'.*pip install numba .*pip install -e '\.\[jit\]'",
    ):
        _jit.jit_in_use()


def test_info_names_the_step_kernels_and_refuses_a_bad_choice(monkeypatch):
    import json

    from typer.testing import CliRunner

    from gpubptt.cli import app

    runner = CliRunner()
    monkeypatch.setenv(_jit.JIT_VAR, "numpy")
    result = runner.invoke(app, ["info", "--backend", "numpy", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jit"] == {"in_use": "numpy"}
    monkeypatch.setenv(_jit.JIT_VAR, "fast")
    result = runner.invoke(app, ["info", "--backend", "numpy"])
    assert result.exit_code == 2
    assert "GPUBPTT_JIT='fast' is not a step-kernel choice" in result.output


@pytest.mark.parametrize("case", ["forward half refused", "backward half refused", "2 layers bidirectional",
                                  "recompute", "vjp"])  # fmt: skip
def test_lstm_compiled_loops_work_in_the_gates_buffer(case, monkeypatch):
    """Where the LSTM's compiled loops can run, the engine projects the input into the gates buffer A and the loops
    work there in place (the forward adds h_{t-1} @ Wᵀ, the backward writes ∂a over the gates): through a
    bidirectional stack with lengths, recomputed segments (the later ones carry ∂E/∂c on the per-step path) and a
    pullback; a half whose loop cannot run (refused here for the 3-row half of B = 5) takes the per-step path on
    the same buffer (the backward into ``work``, its rows copied over). The gradients against float64 central
    differences of the reference."""
    from gpubptt.backend import numpy_backend
    from tests.reference import numeric, ref_gated_loss

    _force_compiled_loops(monkeypatch, split_min_state=2)
    refused = {"forward half refused": 5, "backward half refused": 6}.get(case)  # that loop's number of arrays
    used = []
    step_loops = lstm._Kernels.step_loops

    def some_refused(self, be, w, rows, arrays):  # the forward loop's five arrays (pre, S, A, …), the backward's six
        loops = None if len(arrays) == refused and rows == 3 else step_loops(self, be, w, rows, arrays)
        used.append((len(arrays), rows, loops is not None, len(arrays) == 5 and arrays[0] is arrays[2]))
        return loops

    monkeypatch.setattr(lstm._Kernels, "step_loops", some_refused)
    be = numpy_backend.NumpyBackend(blas="mkl")
    be.blas_threads.most = max(2, be.blas_threads.most)
    layers, bi = (2, True) if case == "2 layers bidirectional" else (1, False)
    T, B, D, K = 4, 5, 3, 4
    model = gpubptt.RNN(D, H, K, cell="lstm", num_layers=layers, bidirectional=bi, bias=True, backend=be, seed=8,
                        dtype="float64", init="torch")  # fmt: skip
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    h0, c0 = rng.normal(size=(2, model.num_states, B, H)) * 0.5
    lengths = np.array([4, 2, 3, 4, 1]) if bi else np.full(B, T)
    p = {k: np.array(v) for k, v in model.params.items()}
    if case == "vjp":  # E = Σ dY ⊙ Y + dh ⊙ h_n: the pullback with ∂E/∂h_n alone runs the compiled loops
        dY, dh = rng.normal(size=(T, B, H)), rng.normal(size=(1, B, H))
        _, pullback = model.vjp(x, (h0, c0))
        grads = pullback(dY, (dh, None))

        def f():
            out = model.forward(x, (h0, c0))
            return float(np.sum(dY * out.states) + np.sum(dh * out.final_state[0]))

        p = model.params  # perturbed in place by the central differences
    else:
        kw = {"recompute": 2} if case == "recompute" else {}
        loss, grads = model.loss_and_grads(x, y, (h0, c0), lengths=None if not bi else lengths, **kw)
        f = lambda: ref_gated_loss("lstm", p, x, y, h0, c0, lengths, "sum", num_layers=layers,  # noqa: E731
                                   bidirectional=bi)  # fmt: skip
        assert loss == pytest.approx(f(), rel=1e-12)
    forward = [u for u in used if u[0] == 5]
    assert forward and all(u[3] for u in forward)  # every forward loop got pre = A: the projection went there
    if refused:
        assert sorted(u[:3] for u in used) == [(5, 2, True), (5, 3, refused != 5), (6, 2, True), (6, 3, refused != 6)]
    else:
        assert any(u[0] == 6 and u[2] for u in used)  # a backward loop ran compiled, in place
    for name, arr in [*((k, p[k]) for k in p if k in grads), ("s0", h0), ("c0", c0)]:
        idx = rng.choice(arr.size, min(arr.size, 8), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("layers,bidirectional", [(2, False), (1, True)])
def test_batch_halves_in_two_threads_match_central_differences_of_the_reference(cell, layers, bidirectional,
                                                                                  monkeypatch):  # fmt: skip
    """With compiled kernels the step loops run as two batch halves at once (here forced on at B = 5: rows 0–2
    and 3–4); inside a bidirectional layer's direction jobs they run one after the other."""
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from gpubptt.backend.numpy_backend import NumpyBackend
    from gpubptt.cells import _loops
    from tests.reference import numeric, ref_gated_loss

    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", 2)
    be = NumpyBackend()  # its own kernels (numba) and thread pool, threads whatever the core count here
    be.blas_threads.most = max(2, be.blas_threads.most)
    T, B, D, K = 4, 5, 3, 4
    model = gpubptt.RNN(D, H, K, cell=cell, num_layers=layers, bidirectional=bidirectional, bias=True, backend=be,
                        seed=6, dtype="float64", init="torch")  # fmt: skip
    rng = np.random.default_rng(6)
    x, y, lengths = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B)), np.array([4, 2, 3, 4, 1])
    h0, c0 = rng.normal(size=(2, model.num_states, B, H)) * 0.5
    s0 = (h0, c0) if cell == "lstm" else h0
    loss, grads = model.loss_and_grads(x, y, s0, lengths=lengths)
    assert be._pool is not None  # jobs did run in threads
    p = {k: np.array(v) for k, v in model.params.items()}
    kw = dict(num_layers=layers, bidirectional=bidirectional)
    f = lambda: ref_gated_loss(cell, p, x, y, h0, c0, lengths, "sum", **kw)  # noqa: E731
    assert loss == pytest.approx(f(), rel=1e-12)
    arrays = [*p.items(), ("s0", h0)] + ([("c0", c0)] if cell == "lstm" else [])
    for name, arr in arrays:
        idx = rng.choice(arr.size, min(arr.size, 8), replace=False)
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


def _doubled(a, out):  # a small function to compile: out = 2a
    for i in range(a.shape[0]):
        out[i] = 2.0 * a[i]


def test_kernels_compile_in_memory_where_no_cache_folder_can_be_written(monkeypatch):
    """A read-only install with a read-only home: numba finds no folder for its disk cache and refuses
    ``cache=True``; the kernels then compile without it instead of failing the model's first call."""
    numba = pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    import numba.core.caching as caching

    def read_only(self):
        raise PermissionError(13, "Read-only file system", self.get_cache_path())

    monkeypatch.setattr(caching._CacheLocator, "ensure_cache_path", read_only)
    with pytest.raises(RuntimeError, match="cannot cache"):  # what numba does with cache=True there
        numba.njit(cache=True)(_doubled)
    monkeypatch.setattr(_jit, "_compiled", {})
    (doubled,) = _jit.compile_kernels(_doubled, choice="numba")
    a = np.arange(5.0)
    out = np.empty(5)
    doubled(a, out)
    np.testing.assert_array_equal(out, 2 * a)


def test_the_command_line_refuses_gpubptt_jit_numba_without_numba_in_one_line(tmp_path):
    """It was a traceback from inside the first gated step, after train had printed its header."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "numba.py").write_text('raise ImportError("no numba here")\n')
    env = {
        **os.environ,
        "GPUBPTT_JIT": "numba",
        "PYTHONPATH": os.pathsep.join([str(fake), str(Path(gpubptt.__file__).parents[1])]),
    }
    args = ["bench", "--backend", "numpy", "--cell", "gru", "--seq-lens", "2", "--hidden-sizes", "3", "--batch", "2"]
    run = subprocess.run(
        [sys.executable, "-m", "gpubptt", *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "error: GPUBPTT_JIT=numba asks for compiled step kernels, but numba does not import" in run.stderr


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_the_compiled_loops_run_at_small_shapes_with_the_default_thresholds(cell, monkeypatch):
    """A step GEMM under MKL_MIN_FLOPS still runs in the compiled loops (its weight packed, ``pack(loop=True)``):
    the gated cells ran such steps in Python, 1.5–2.6× torch's LSTM at B = 1–4, H = 128; the gradients as the
    NumPy twins' per-step path."""
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    from gpubptt.backend import _mkl, numpy_backend

    if _mkl.load_mkl()[0] is None:
        pytest.skip("MKL unavailable: pip install mkl")
    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    module = {"gru": gru, "lstm": lstm}[cell]
    used = []
    step_loops = module._Kernels.step_loops
    monkeypatch.setattr(module._Kernels, "step_loops", lambda *a: used.append(step_loops(*a)) or used[-1])
    be = numpy_backend.NumpyBackend(blas="mkl")
    T, B, D, H, K = 8, 2, 3, 4, 5
    assert 2 * B * H * 4 * H < numpy_backend.MKL_MIN_FLOPS  # a GEMM the size thresholds alone leave to NumPy
    model = gpubptt.RNN(D, H, K, cell=cell, backend=be, seed=4, dtype="float64", init="torch")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    loss, grads = model.loss_and_grads(x, y)
    assert len(used) == 2 and all(u is not None for u in used)  # forward and backward, each one compiled call
    kernels = module.kernels(be)
    monkeypatch.setattr(kernels, "jit", None)  # the NumPy twins, step by step
    used.clear()
    want_loss, want = gpubptt.RNN(D, H, K, cell=cell, backend=be, seed=4, dtype="float64",
                                  init="torch").loss_and_grads(x, y)  # fmt: skip
    assert all(u is None for u in used)  # the reference ran no compiled loop
    assert loss == pytest.approx(want_loss, rel=1e-12)
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=1e-10, atol=1e-13, err_msg=name)
