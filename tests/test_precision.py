"""``precision`` "fp32" | "tf32" | "bf16": the rounding against exact rational arithmetic, the CUDA rounding body read
as integer arithmetic, the gradient error against the float64 path, a short training run against fp32, refusals,
copies; and (marked ``gpu``) CuPy's tensor-core GEMMs against the NumPy emulation."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import pickle
import re
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import gpubptt
from gpubptt.backend import get_backend
from gpubptt.backend.numpy_backend import NumpyBackend
from gpubptt.backend.precision import BF16_ROUND_BODY, PRECISIONS, round_bf16, round_tf32
from gpubptt.errors import InputError

from .cuda_stand_ins import DevArray, Devices

MANTISSA = {"tf32": 10, "bf16": 7}
ROUND = {"tf32": round_tf32, "bf16": round_bf16}
#: the measured worst gradient error (below), with margin: 4× one operand's unit roundoff 2^−(p+1)
GRAD_BOUND = {"fp32": 1e-5, "tf32": 4 * 2.0**-11, "bf16": 4 * 2.0**-8}


# -- the rounding ---------------------------------------------------------------------------------
def reference_round(x: float, p: int) -> float:
    """x rounded to p explicit mantissa bits (float32's exponent range), nearest, ties to even: exact rationals."""
    if math.isnan(x) or math.isinf(x) or x == 0:
        return x
    e = max(math.frexp(x)[1] - 1, -126)  # the binade of |x| (subnormals share the smallest one's spacing)
    ulp = Fraction(2) ** (e - p)
    r = round(Fraction(x) / ulp) * ulp  # Python's round of a Fraction: half to even
    if abs(r) >= 2**128:  # past the largest finite value: overflow to inf
        return math.copysign(math.inf, x)
    return math.copysign(float(r), x) if r == 0 else float(r)


def f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def sample_values(p: int) -> np.ndarray:
    """A few hundred float32 values: random bit patterns, exact ties (both parities), values just off a tie,
    subnormals, ±0, the largest finite, ±inf and NaN."""
    rng = np.random.default_rng(7)
    d = 23 - p
    bits = list(rng.integers(0, 2**32, size=200, dtype=np.uint64))
    for b in rng.integers(0, 2**32, size=60, dtype=np.uint64):
        tie = (int(b) & ~((1 << d) - 1)) | (1 << (d - 1))  # exactly halfway between two neighbours
        bits += [tie, tie ^ (1 << d), tie + 1, tie - 1]
    bits += [1, 2, 0x007FFFFF, 0x00400000 | (1 << (d - 1)), 0x80000001, 0x7F7FFFFF, 0xFF7FFFFF, 0, 0x80000000]
    bits += [0x7F800000, 0xFF800000]
    finite = [b for b in (int(b) & 0xFFFFFFFF for b in bits) if (b & 0x7F800000) != 0x7F800000 or b & 0x7FFFFF == 0]
    return np.array(finite, dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_rounding_matches_exact_rational_round_half_even(precision):
    x = sample_values(MANTISSA[precision])
    got = ROUND[precision](x, np.empty_like(x))
    want = np.array([reference_round(float(v), MANTISSA[precision]) for v in x], dtype=np.float64)
    np.testing.assert_array_equal(got.astype(np.float64), want)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # −0 stays −0
    top = np.array([f32(0x7F7FFFFF), f32(0x7F7F7FFF)], np.float32)  # the largest finite float32, and just below a tie
    assert round_bf16(top, np.empty(2, np.float32)).tolist() == [np.inf, f32(0x7F7F0000)]  # RNE overflows the first


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_rounding_keeps_nan_and_reads_transposed_views(precision):
    nans = np.array([0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFF800001, 0xFFFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.isnan(ROUND[precision](nans, np.empty_like(nans))).all()
    a = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    got = ROUND[precision](a.T, np.empty((7, 5), np.float32))
    want = np.array([[reference_round(float(v), MANTISSA[precision]) for v in row] for row in a.T])
    np.testing.assert_array_equal(got, want)


def run_c_body(body: str, x: np.ndarray) -> np.ndarray:
    """The CUDA kernel body read as integer arithmetic on NumPy uint32 arrays (one thread per element)."""
    ns = {"x": x.view(np.uint32).astype(np.uint32), "np": np}
    for stmt in body.strip().split(";"):
        stmt = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)u\b", r"\1", stmt.strip())
        stmt = stmt.replace("__float_as_uint(x)", "x").replace("(unsigned short)", "")
        if not stmt:
            continue
        lhs, rhs = (s.strip() for s in stmt.split("=", 1))
        name = lhs.removeprefix("const unsigned int ").strip()
        ns[name] = np.asarray(eval(rhs, ns)).astype(np.uint32)  # C's unsigned arithmetic wraps, as uint32 does
    return ns["y"]


def test_cuda_bf16_rounding_body_matches_the_reference():
    x = np.concatenate([sample_values(7), np.array([np.nan, -np.nan], dtype=np.float32)])
    y = run_c_body(BF16_ROUND_BODY, x)
    assert (y <= 0xFFFF).all()
    got = (y << 16).astype(np.uint32).view(np.float32)  # the bfloat16 bits are float32's top half
    want = np.array([reference_round(float(v), 7) for v in x])
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()


# -- the model ----------------------------------------------------------------------------------
def grad_error(model, seed: int, tokens: bool, T: int = 12, B: int = 4) -> float:
    """max over parameters of ‖g − g64‖ / ‖g64‖, g64 from the float64 copy of the same weights."""
    rng = np.random.default_rng(seed)
    D, K = model.input_size, model.output_size
    ref = gpubptt.RNN.from_params(model.params, backend="numpy", dtype="float64", cell=model.cell_name)
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    be = model.backend
    _, g = model.loss_and_grads(be.asarray(x if tokens else x.astype(model.dtype)), be.asarray(y))
    _, g64 = ref.loss_and_grads(x, y)
    return max(float(np.linalg.norm(gpubptt.to_numpy(g[k]) - g64[k]) / np.linalg.norm(g64[k])) for k in model.params)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gradient_error_against_float64_within_the_stated_bound(cell, precision):
    model = gpubptt.RNN(10, 16, 10, cell=cell, backend="numpy", seed=3, init="torch", precision=precision)
    errors = [grad_error(model, seed, tokens=seed == 0) for seed in (0, 1)]
    assert max(errors) < GRAD_BOUND[precision], errors
    if precision != "fp32":  # the operands were rounded: the error is that of the precision, not of float32
        assert min(errors) > 2.0 ** -(MANTISSA[precision] + 5), errors


def loss_curve(cell: str, precision: str) -> np.ndarray:
    """Per-step mean loss of plain SGD on recalling the token two steps back: ``benchmarks/precision_error.py``'s
    curve (the one its table reports)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_error.py"
    spec = importlib.util.spec_from_file_location("bench_precision_error", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.loss_curve(cell, precision)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_short_training_run_follows_fp32(cell):
    ref = loss_curve(cell, "fp32")
    assert ref[-1] < 0.9 * ref[0]  # it learns
    for precision, tol in (("tf32", 5e-3), ("bf16", 2.5e-2)):
        rel = np.max(np.abs(loss_curve(cell, precision) - ref) / ref)
        assert rel < tol, (precision, rel)


def test_bad_precisions_are_refused_before_any_work():
    with pytest.raises(InputError, match="expected one of fp32, tf32, bf16"):
        gpubptt.RNN(4, 5, 4, backend="numpy", precision="fp16")
    with pytest.raises(InputError, match="float64 model runs precision='fp32' only"):
        gpubptt.RNN(4, 5, 4, backend="numpy", dtype="float64", precision="bf16")
    model = gpubptt.RNN(4, 5, 4, backend="numpy", dtype="float64", seed=0)
    with pytest.raises(InputError, match="float64"):
        model.precision = "tf32"
    assert model.precision == "fp32"
    m32 = gpubptt.RNN(4, 5, 4, backend="numpy", seed=0)
    with pytest.raises(InputError, match="unknown precision 3"):
        m32.precision = 3
    with pytest.raises(InputError, match="float64"):
        gpubptt.RNN.from_params(m32.params, backend="numpy", dtype="float64", precision="tf32")
    with pytest.raises(InputError, match="expected one of"):
        get_backend("numpy").with_precision("int8")
    with pytest.raises(InputError, match="float32 arrays"):
        round_bf16(np.ones(3), np.empty(3))


def test_precision_travels_with_copies_and_the_backend_stays_fp32():
    be = get_backend("numpy")
    model = gpubptt.RNN(6, 8, 6, cell="gru", backend="numpy", seed=0, precision="bf16")
    assert be.precision == "fp32" and model.backend.exact is be and "precision='bf16'" in repr(model)
    sd = model.to_torch()
    from_torch = gpubptt.RNN.from_torch(*sd, cell="gru", backend="numpy", precision="bf16")
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model), model.to("numpy"), from_torch):
        assert other.precision == "bf16"
    view = model.backend  # a view passed as the backend carries its precision to a float32 model, not a float64 one
    assert gpubptt.RNN.from_params(model.params, backend=view).precision == "bf16"
    assert gpubptt.RNN.from_params(model.params, backend=view, dtype="float64").precision == "fp32"
    x = np.arange(15).reshape(5, 3) % 6
    _, g16 = model.loss_and_grads(x, x)
    model.precision = "fp32"
    _, g32 = model.loss_and_grads(x, x)
    _, g = gpubptt.RNN.from_params(model.params, backend="numpy").loss_and_grads(x, x)
    assert all(np.array_equal(g32[k], g[k]) for k in g)  # fp32 again: exactly the plain model
    assert not all(np.array_equal(g16[k], g[k]) for k in g)


def test_rounded_operands_reuse_their_buffers():
    model = gpubptt.RNN(6, 8, 6, cell="lstm", backend="numpy", seed=0, precision="tf32", num_layers=2)
    x = np.arange(40).reshape(10, 4) % 6
    model.loss_and_grads(x, x)
    pools = model.backend._scratch._local.pools
    held = {k: [id(b) for b in v] for k, v in pools.items()}
    model.loss_and_grads(x, x)
    assert {k: [id(b) for b in v] for k, v in pools.items()} == held  # nothing allocated by the second call


# -- CuPy: tensor cores against the emulation (gpu) ---------------------------------------------------
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cupy_precision_matches_the_numpy_emulation(cupy_be, cell, precision):
    ref = gpubptt.RNN(10, 64, 10, cell=cell, backend="numpy", seed=3, init="torch", precision=precision)
    dev = ref.to("cupy")
    assert dev.precision == precision
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 10, size=(12, 8)), rng.integers(0, 10, size=(12, 8))
    _, g = ref.loss_and_grads(x, y)
    for use_graphs in (False, True):
        dev.use_graphs = use_graphs
        _, gd = dev.loss_and_grads(cupy_be.asarray(x), cupy_be.asarray(y))
        # bf16 operands are rounded identically; tf32 hardware may truncate (2^-10, twice the RNE bound)
        bound = GRAD_BOUND[precision] * (2 if precision == "tf32" else 1)
        for k in g:
            err = np.linalg.norm(gpubptt.to_numpy(gd[k]) - g[k]) / np.linalg.norm(g[k])
            assert err < bound, (k, err)
    assert grad_error(dev, 1, tokens=False) < GRAD_BOUND[precision] * (2 if precision == "tf32" else 1)


def test_cupy_precision_refuses_float32_step_kernels(cupy_be):
    model = gpubptt.RNN(8, 32, 8, backend="cupy", seed=0, precision="tf32")
    model.step_kernels = "persistent"
    x = cupy_be.asarray(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(InputError, match="cuBLAS GEMMs"):
        model.loss_and_grads(x, x)


# -- the CLI --------------------------------------------------------------------------------------
def test_cli_train_and_bench_take_a_precision(tmp_path):
    import json

    from typer.testing import CliRunner

    from gpubptt.cli import app
    from gpubptt.training.record import load_checkpoint

    runner = CliRunner()
    train = ["train", "--task", "recall", "--hidden", "8", "--batch", "4", "--steps", "3", "--backend", "numpy"]
    ck = tmp_path / "ck.npz"
    ok = runner.invoke(app, [*train, "--precision", "bf16", "--checkpoint", str(ck)])
    assert ok.exit_code == 0, ok.output
    assert load_checkpoint(ck, backend="numpy").model.precision == "fp32"  # a setting of the call, not recorded
    bad = runner.invoke(app, [*train, "--precision", "fp16"])
    assert bad.exit_code == 2 and "fp32" in bad.output and "bf16" in bad.output
    f64 = runner.invoke(app, [*train, "--precision", "tf32", "--dtype", "float64", "--checkpoint", str(tmp_path / "x")])
    assert f64.exit_code == 2 and "float32" in f64.output and not (tmp_path / "x").exists()
    sizes = ["--seq-lens", "3", "--hidden-sizes", "4", "--batch", "2", "--vocab", "5", "--warmup", "0"]
    sizes += ["--repeats", "1"]
    out = tmp_path / "b.json"
    bench = runner.invoke(app, ["bench", "--backend", "numpy", *sizes, "--precision", "tf32", "--output", str(out)])
    assert bench.exit_code == 0, bench.output
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["precision"] == "tf32" for r in rows)
    refused = runner.invoke(app, ["bench", "--backend", "numpy", *sizes, "--precision", "bf16", "--dtype", "float64"])
    assert refused.exit_code == 2 and "float32" in refused.output


def test_gpu_check_script_and_grid_options_parse():
    import subprocess
    import sys

    subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], check=True)
    for script in ("benchmarks/perf_grid.py", "benchmarks/perf_gated.py"):
        out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
        assert "--precision {fp32,tf32,bf16}" in out and "--rows" in out


# -- the CuPy GEMM path's host side, through a stand-in for CuPy and cuBLAS ------------------------------
def _fake_cupy():
    from types import SimpleNamespace

    def kernel(in_params, out_params, body, name):
        assert (in_params, out_params) == ("float32 x", "uint16 y")

        def run(x, out):
            out[...] = run_c_body(body, np.ascontiguousarray(x)).astype(np.uint16)
            return out

        return run

    stream = SimpleNamespace(ptr=7)
    return SimpleNamespace(
        empty=lambda n, dtype: np.empty(n, dtype=dtype).view(DevArray),
        uint8=np.uint8,
        ascontiguousarray=lambda a: np.ascontiguousarray(a).view(DevArray),
        ElementwiseKernel=kernel,
        cuda=SimpleNamespace(
            get_current_stream=lambda: stream, using_allocator=contextlib.nullcontext, Device=Devices()
        ),
    )


def _fake_cublas(calls):
    """cublasGemmEx computed from raw memory with cuBLAS's column-major rules (tf32: operands rounded RNE)."""
    import ctypes
    from types import SimpleNamespace

    def matrix(ptr, dtype, op, rows, cols, ld):  # op(X) of shape (rows, cols), X stored column-major
        r, c = (cols, rows) if op else (rows, cols)
        itemsize = np.dtype(dtype).itemsize
        raw = (ctypes.c_char * ((ld * (c - 1) + r) * itemsize)).from_address(ptr)
        mem = np.lib.stride_tricks.as_strided(
            np.frombuffer(raw, dtype=dtype), shape=(r, c), strides=(itemsize, ld * itemsize)
        )
        X = (mem.astype(np.uint32) << 16).view(np.float32) if dtype == np.uint16 else mem.astype(np.float32)
        return X.T if op else X

    def gemm_ex(h, opb, opa, n, m, k, alpha, B, btype, ldb, A, atype, lda, beta, C, ctype, ldc, compute, algo):
        calls.append((btype, atype, ctype, compute))
        dtype = np.uint16 if btype == 14 else np.float32
        X, Y = matrix(B, dtype, opb, n, k, ldb), matrix(A, dtype, opa, k, m, lda)
        if compute == 77:  # TF32: our specification of it
            X, Y = round_tf32(X, np.empty_like(X)), round_tf32(Y, np.empty_like(Y))
        raw = (ctypes.c_char * ((ldc * (m - 1) + n) * 4)).from_address(C)
        Cm = np.lib.stride_tricks.as_strided(np.frombuffer(raw, np.float32), shape=(n, m), strides=(4, ldc * 4))
        Cm[...] = alpha._obj.value * (X @ Y) + (beta._obj.value * Cm if beta._obj.value else 0)
        return 0

    ok = lambda *a: 0  # noqa: E731
    return SimpleNamespace(cublasGemmEx=gemm_ex, cublasSgemm_v2=ok, cublasDgemm_v2=ok, cublasSetStream_v2=ok,
                           cublasSetWorkspace_v2=ok, cublasCreate_v2=ok)  # fmt: skip


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "a_T", "b_T", "row_views"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cublas_gemm_ex_path_computes_the_emulated_product(monkeypatch, precision, case, accumulate):
    from gpubptt.backend import _cublas
    from gpubptt.backend.precision import Scratch

    calls = []
    monkeypatch.setattr(_cublas, "_load_cublas", lambda cp: _fake_cublas(calls))
    matmul = _cublas.cublas_matmul(_fake_cupy())
    rng = np.random.default_rng(4)
    m, k, n = 5, 6, 3
    A = rng.normal(size=(m, k)).astype(np.float32)
    Bm = rng.normal(size=(k, n)).astype(np.float32)
    a = (A.T.copy().T if case == "a_T" else A).view(DevArray)
    b = (Bm.T.copy().T if case == "b_T" else Bm).view(DevArray)
    if case == "row_views":
        a = rng.normal(size=(3, m, k)).astype(np.float32).view(DevArray)[1]
        A = np.asarray(a).copy()
    start = rng.normal(size=(m, n)).astype(np.float32)
    out = start.copy().view(DevArray)
    matmul(a, b, out, accumulate, precision, Scratch())
    want = start.copy()
    get_backend("numpy").with_precision(precision).matmul(A, Bm, want, accumulate=accumulate)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-6)
    assert calls == [(14, 14, 0, 68)] if precision == "bf16" else calls == [(0, 0, 0, 77)]


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_a_weight_packed_under_a_precision_is_rounded_once_and_gives_the_same_products(precision):
    from gpubptt.backend.precision import Rounded

    be = get_backend("numpy").with_precision(precision)
    rng = np.random.default_rng(11)
    W = rng.normal(size=(24, 40)).astype(np.float32)
    handle = be.pack(W, 16, 8)
    assert type(handle) is Rounded and be.pack(W, 16, 1) is W  # one step: nothing to repay a rounding
    for _ in range(3):  # several steps against the one rounded weight
        a = rng.normal(size=(16, 24)).astype(np.float32)
        once, each = np.empty((16, 40), np.float32), np.empty((16, 40), np.float32)
        be.matmul(a, handle, once)
        be.matmul(a, W, each)
        np.testing.assert_array_equal(once, each)
    exact = np.empty((16, 40), np.float32)
    be.exact.matmul(a, handle, exact)  # the float32 backend reads the raw weight
    np.testing.assert_allclose(exact, a @ W, rtol=1e-5, atol=1e-5)


def test_a_precision_view_shares_its_backends_settings_and_threads():
    be = NumpyBackend()
    view = be.with_precision("bf16")
    be.concurrent = False
    assert view.concurrent is False  # set on the backend after the view was made
    view.concurrent = True
    assert be.concurrent is True
    ran = []
    view.run_concurrently([lambda: ran.append(1), lambda: ran.append(2)])
    assert sorted(ran) == [1, 2]
    if view.blas_threads.most >= 2:  # the jobs ran on the backend's own pool, not on one of the view's
        assert be._pool is not None and view.__dict__.get("_pool") is None


def test_to_a_precision_view_takes_the_views_precision_and_to_a_name_keeps_the_models():
    m = gpubptt.RNN(3, 4, 5, backend="numpy", seed=0, precision="bf16")
    assert m.to(get_backend("numpy").with_precision("tf32")).precision == "tf32"
    assert m.to("numpy").precision == "bf16" and m.to(get_backend("numpy")).precision == "bf16"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the hook only reads the flags
def test_bench_torch_reference_leaves_torch_tf32_flags_as_they_were():
    torch = pytest.importorskip("torch")
    from gpubptt.bench import BenchConfig, run_bench

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, True  # a caller's own choice
        seen = []  # the flags torch's backward runs under (its GEMMs read them then)
        hook = torch.nn.modules.module.register_module_full_backward_hook(
            lambda *_: seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        )
        cfg = BenchConfig(backends=["numpy"], seq_lens=[4], hidden_sizes=[8], batch=2, D=6, K=6, warmup=0, repeats=1,
                          compare="torch", precision="tf32")  # fmt: skip
        try:
            row = run_bench(cfg)["rows"][0]
        finally:
            hook.remove()
        assert seen and set(seen) == {(True, True)}
        assert row["torch"]["settings"]["cudnn.allow_tf32"] is True  # torch ran with the matching setting
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
