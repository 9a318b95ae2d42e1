"""The gated cells' σ near a shut gate, against torch float64 autograd: a gate's bias shifted far negative (−20 in
float32, −40 in float64, where σ is about 2e-9 / 4e-18) leaves σ(1 − σ) in the backward relatively accurate only if
σ itself is (σ(x) = 1 / (1 + e^−x); the form (1 + tanh(x/2)) / 2 is within a rounding of 0 there, and the gate's
bias gradient was noise: 7.7e-2 relative error at −16 in float32). Each path: the NumPy twins, the compiled kernels
(numba) step by step, and the whole compiled step loops under MKL (v?Exp)."""

from __future__ import annotations

import numpy as np
import pytest

import gpubptt
from gpubptt.cells import _jit, gru, lstm

torch = pytest.importorskip("torch")

D, H, K, T, B = 3, 4, 5, 6, 3
GATES = {("lstm", "i"): 0, ("lstm", "f"): 1, ("gru", "r"): 0, ("gru", "z"): 1}  # the gate's row block in b
SHIFT = {"float32": -20.0, "float64": -40.0}
RTOL = {"float32": 1e-5, "float64": 1e-12}  # torch float32 itself: 4e-7 on the input gate's bias at −16


def _backend(path, monkeypatch):
    """A fresh NumPy backend running ``path``'s step kernels; skips where numba (or MKL) is absent."""
    from gpubptt.backend import _mkl, numpy_backend
    from gpubptt.cells import _loops

    if path == "numpy":
        monkeypatch.setenv(_jit.JIT_VAR, "numpy")
        return numpy_backend.NumpyBackend(blas="numpy")
    pytest.importorskip("numba", reason="numba unavailable: pip install numba")
    monkeypatch.setenv(_jit.JIT_VAR, "numba")
    if path == "numba":
        return numpy_backend.NumpyBackend(blas="numpy")
    if _mkl.load_mkl()[0] is None:
        pytest.skip("MKL unavailable: pip install mkl")
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 1)  # every GEMM MKL's, the step weight packed
    monkeypatch.setattr(numpy_backend, "PACK_MIN_ROWS", 1)
    monkeypatch.setattr(_loops, "SPLIT_MIN_STATE", 1 << 40)
    return numpy_backend.NumpyBackend(blas="mkl")


@pytest.mark.parametrize("path", ["numpy", "numba", "mkl loops"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell,gate", list(GATES))
def test_a_nearly_shut_gate_has_the_gradients_of_torch_float64_autograd(cell, gate, dtype, path, monkeypatch):
    be = _backend(path, monkeypatch)
    kind = {"gru": gru, "lstm": lstm}[cell]._Kernels
    used = []
    step_loops = kind.step_loops
    monkeypatch.setattr(kind, "step_loops", lambda *a: used.append(step_loops(*a)) or used[-1])
    torch.manual_seed(3)
    module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](D, H).double()
    lin = torch.nn.Linear(H, K).double()
    block = slice(GATES[cell, gate] * H, (GATES[cell, gate] + 1) * H)
    rng = np.random.default_rng(4)
    with torch.no_grad():
        module.bias_ih_l0[block] += SHIFT[dtype]
        for param in [*module.parameters(), *lin.parameters()]:  # values the dtype holds: the same model in both
            param.copy_(param.to(getattr(torch, dtype)).double())
    x = rng.normal(size=(T, B, D)).astype(dtype)
    y = rng.integers(0, K, size=(T, B))
    s = rng.normal(size=(2, 1, B, H)).astype(dtype) * 0.5  # h0, c0
    hx = tuple(torch.as_tensor(a.astype(np.float64)) for a in s)
    hx = hx if cell == "lstm" else hx[0]
    out, _ = module(torch.as_tensor(x.astype(np.float64)), hx)
    loss_t = torch.nn.functional.cross_entropy(lin(out).reshape(-1, K), torch.as_tensor(y).reshape(-1), reduction="sum")
    loss_t.backward()

    state = {k: v.float() if dtype == "float32" else v for k, v in module.state_dict().items()}
    head = {k: v.float() if dtype == "float32" else v for k, v in lin.state_dict().items()}
    model = gpubptt.RNN.from_torch(state, head, cell=cell, backend=be)
    assert model.dtype == np.dtype(dtype)
    with np.errstate(all="raise"):  # exp(−x) overflowing to inf for the shut gate warns nowhere
        loss, grads = model.loss_and_grads(x, y, (s[0], s[1]) if cell == "lstm" else s[0])
    assert all(np.isfinite(g).all() for g in grads.values())
    if path == "mkl loops":
        assert len(used) == 2 and all(u is not None for u in used)  # the forward and backward loops ran compiled
    else:
        assert all(u is None for u in used)
        assert (kind(be).jit is None) == (path == "numpy")

    assert float(loss) == pytest.approx(loss_t.item(), rel=RTOL[dtype])
    g_rnn, g_lin = model.to_torch(grads=grads)
    want = module.bias_ih_l0.grad.numpy()[block]
    got = np.asarray(g_rnn["bias_ih_l0"], dtype=np.float64)[block]
    assert np.abs(want).max() > 0
    assert np.linalg.norm(got - want) <= RTOL[dtype] * np.linalg.norm(want), (got, want)
    for name, param in [*module.named_parameters(), *(("lin." + k, v) for k, v in lin.named_parameters())]:
        ours = np.asarray(g_lin[name[4:]] if name.startswith("lin.") else g_rnn[name], dtype=np.float64)
        theirs = param.grad.numpy()
        assert np.linalg.norm(ours - theirs) <= RTOL[dtype] * np.linalg.norm(theirs), name


@pytest.mark.parametrize("path", ["numpy", "numba", "mkl loops"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_gates_saturated_past_exp_overflow_give_finite_gradients_without_a_warning(cell, dtype, path, monkeypatch):
    """Gate arguments of ±1e4: exp(−x) overflows to inf (σ = 0 exactly) or underflows to 0 (σ = 1); no NaN, no
    floating-point warning (an error under errstate "raise"), the loss and gradients those of torch float64."""
    be = _backend(path, monkeypatch)
    torch.manual_seed(5)
    module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell](D, H).double()
    lin = torch.nn.Linear(H, K).double()
    with torch.no_grad():
        module.bias_ih_l0.copy_(torch.tensor([-1e4, 1e4], dtype=torch.float64).repeat(module.bias_ih_l0.numel() // 2))
    x = np.random.default_rng(5).normal(size=(T, B, D)).astype(dtype)
    y = np.random.default_rng(6).integers(0, K, size=(T, B))
    out, _ = module(torch.as_tensor(x.astype(np.float64)))
    loss_t = torch.nn.functional.cross_entropy(lin(out).reshape(-1, K), torch.as_tensor(y).reshape(-1), reduction="sum")
    loss_t.backward()
    cast = (lambda v: v.float()) if dtype == "float32" else (lambda v: v)
    state, head = ({k: cast(v) for k, v in m.state_dict().items()} for m in (module, lin))
    model = gpubptt.RNN.from_torch(state, head, cell=cell, backend=be)
    with np.errstate(all="raise"):
        loss, grads = model.loss_and_grads(x, y)
    assert all(np.isfinite(g).all() for g in grads.values())
    assert float(loss) == pytest.approx(loss_t.item(), rel=RTOL[dtype])
    g_rnn, _ = model.to_torch(grads=grads)
    np.testing.assert_allclose(g_rnn["weight_ih_l0"], module.weight_ih_l0.grad.numpy(), rtol=1e-4, atol=1e-6)
