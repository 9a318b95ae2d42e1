"""The NumPy backend's MKL GEMMs (``backend/_mkl.py``): every operand layout against a float64 product, the
fallbacks to NumPy's matmul, packed weights, large GEMMs split over threads, the ``GPUBPTT_BLAS`` choice, and
gradients with MKL in the step loops against a float64 model on NumPy's own BLAS. Tests that need MKL skip
with the reason where it is absent (``pip install mkl``)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from typer.testing import CliRunner

import gpubptt
from gpubptt.backend import get_backend, numpy_backend
from gpubptt.backend._mkl import PackedMatrix, PackSlot, load_mkl
from gpubptt.backend.numpy_backend import MKL_MIN_FLOPS, NumpyBackend
from gpubptt.cli import app

MKL, WHY = load_mkl()
needs_mkl = pytest.mark.skipif(MKL is None, reason=f"MKL unavailable ({WHY}): pip install mkl")


def mkl_backend(**threads) -> NumpyBackend:
    be = NumpyBackend(blas="mkl")
    for k, v in threads.items():
        setattr(be.blas_threads, k, v)
    return be


def operand(rng, shape, dtype, layout):
    """A (p, q) array laid out as ``layout``: "C" row-major, "F" a transposed view, "ld" rows of a wider array."""
    p, q = shape
    if layout == "C":
        return rng.normal(size=(p, q)).astype(dtype)
    if layout == "F":
        return rng.normal(size=(q, p)).astype(dtype).T
    return rng.normal(size=(p, q + 5)).astype(dtype)[:, 2 : 2 + q]  # leading dimension q + 5


def reference(a, b, out0, accumulate):
    """The product in float64 by NumPy (an independent GEMM), plus the old out where accumulating."""
    ref = a.astype(np.float64) @ b.astype(np.float64)
    return ref + out0.astype(np.float64) if accumulate else ref


def tolerance(dtype, k):
    return 50 * np.finfo(dtype).eps * np.sqrt(k)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("a_layout", ["C", "F", "ld"])
@pytest.mark.parametrize("b_layout", ["C", "F", "ld"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_mkl_gemm_matches_a_float64_product_for_every_layout(dtype, a_layout, b_layout, accumulate):
    rng = np.random.default_rng(0)
    m, k, n = 7, 11, 5
    a, b = operand(rng, (m, k), dtype, a_layout), operand(rng, (k, n), dtype, b_layout)
    wide = rng.normal(size=(m, n + 3)).astype(dtype)
    out = wide[:, 1 : 1 + n]  # a leading dimension of its own
    out0, untouched = out.copy(), wide[:, 0].copy()
    assert MKL.gemm(a, b, out, accumulate)  # MKL ran it (no copy, no fallback)
    np.testing.assert_allclose(
        out, reference(a, b, out0, accumulate), rtol=tolerance(dtype, k), atol=tolerance(dtype, k)
    )
    np.testing.assert_array_equal(wide[:, 0], untouched)  # nothing written outside out


@needs_mkl
def test_the_backend_sends_gemms_of_mkl_min_flops_to_mkl_and_smaller_ones_to_numpy(monkeypatch):
    be = mkl_backend(most=1)
    ran = []
    monkeypatch.setattr(be, "_numpy_matmul", lambda a, b, out, acc: ran.append(a.shape) or np.matmul(a, b, out=out))
    rng = np.random.default_rng(1)
    side = round((MKL_MIN_FLOPS / 2) ** (1 / 3)) + 2
    for m in (side, 2):
        a, b = rng.normal(size=(m, side)).astype(np.float32), rng.normal(size=(side, side)).astype(np.float32)
        out = np.empty((m, side), np.float32)
        be.matmul(a, b.T, out)
        np.testing.assert_allclose(out, reference(a, b.T, out, False), rtol=1e-4, atol=1e-4)
    assert ran == [(2, side)]  # the small one only


@needs_mkl
@pytest.mark.parametrize("case", ["strided", "int", "mixed", "overlap", "readonly_out", "empty", "subclass"])
def test_operands_mkl_cannot_take_fall_back_to_numpy_with_its_results(case, monkeypatch):
    """``Mkl.gemm`` declines (returns False, nothing written) and ``matmul`` gives NumPy's own answer."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    be = mkl_backend(most=1)
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 4)).astype(np.float32)
    b = rng.normal(size=(4, 3)).astype(np.float32)
    out = np.zeros((6, 3), np.float32)
    if case == "strided":
        a = rng.normal(size=(12, 8)).astype(np.float32)[::2, ::2]  # no unit stride either way
    elif case == "int":
        a, b, out = (x.astype(np.int64) for x in (a * 10, b * 10, out))
    elif case == "mixed":
        b = b.astype(np.float64)
    elif case == "overlap":
        buf = rng.normal(size=(6, 4)).astype(np.float32)
        a, b, out = buf, rng.normal(size=(4, 3)).astype(np.float32), buf[:, :3]  # out inside a
    elif case == "readonly_out":
        out.flags.writeable = False
    elif case == "empty":
        a, b, out = a[:, :0], b[:0], out  # k = 0: out = 0
        out[...] = 7
    elif case == "subclass":
        a = a.view(np.matrix)
    want = np.matmul(a.copy(), b.copy())
    before = out.copy()
    assert not MKL.gemm(a, b, out, False)
    np.testing.assert_array_equal(out, before)  # declined: nothing written
    if case == "readonly_out":
        with pytest.raises(ValueError, match="read-only"):  # NumPy's own refusal
            be.matmul(a, b, out)
        return
    be.matmul(a, b, out)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


@needs_mkl
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b_layout", ["C", "F"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_packed_weights_give_the_unpacked_product_for_many_operands(dtype, b_layout, accumulate, monkeypatch):
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    be = mkl_backend(most=1)
    rng = np.random.default_rng(3)
    rows, k, n = 4, 9, 6
    b = operand(rng, (k, n), dtype, b_layout)
    handle = be.pack(b, rows)
    assert isinstance(handle, PackedMatrix) and handle.shape == (k, n)
    b0 = b.copy()
    for a_layout in ("C", "F", "ld"):  # several operands against the one pack, as the steps of a recurrence
        a = operand(rng, (rows, k), dtype, a_layout)
        out = rng.normal(size=(rows, n)).astype(dtype)
        out0 = out.copy()
        be.matmul(a, handle, out, accumulate=accumulate)
        np.testing.assert_allclose(out, reference(a, b0, out0, accumulate), rtol=tolerance(dtype, k),
                                   atol=tolerance(dtype, k))  # fmt: skip
    a = rng.normal(size=(rows + 3, k)).astype(dtype)  # another row count: a packed B serves any
    out = np.empty((rows + 3, n), dtype)
    be.matmul(a, handle, out)
    np.testing.assert_allclose(out, reference(a, b0, out, False), rtol=tolerance(dtype, k), atol=tolerance(dtype, k))
    np.testing.assert_array_equal(b, b0)  # packing leaves the weight as it was


@needs_mkl
def test_a_handle_made_before_the_threads_next_pack_runs_unpacked_and_right(monkeypatch):
    """Packs reuse one buffer per thread: a later pack in the same thread makes an earlier handle stale
    (its GEMMs run on b itself, unpacked); a pack in another thread leaves it valid."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    be = mkl_backend(most=1)
    rng = np.random.default_rng(8)
    a, b1, b2 = rng.normal(size=(3, 5)), rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    out = np.empty((3, 4))
    first = be.pack(b1, 3)
    assert MKL.compute(a, first, out, False)  # valid: runs packed
    with ThreadPoolExecutor(1) as pool:
        pool.submit(be.pack, b2, 3).result()  # another thread's buffer
    assert MKL.compute(a, first, out, False)
    second = be.pack(b2, 3)
    assert not MKL.compute(a, first, out, False)  # stale: declined
    be.matmul(a, first, out)
    np.testing.assert_allclose(out, a @ b1, rtol=1e-12)
    be.matmul(a, second, out)
    np.testing.assert_allclose(out, a @ b2, rtol=1e-12)


def test_pack_returns_the_operand_itself_where_nothing_is_packed(monkeypatch):
    rng = np.random.default_rng(4)
    b = rng.normal(size=(8, 8)).astype(np.float32)
    assert NumpyBackend(blas="numpy").pack(b, 4) is b  # NumPy's own BLAS packs nothing
    if MKL is None:
        return
    assert mkl_backend().pack(b, 4) is b  # below MKL_MIN_FLOPS: no gain, no pack
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    for other in (b.astype(np.int32), rng.normal(size=(8, 16))[::2, ::2], b.astype(np.float16)):
        assert mkl_backend().pack(other, 4) is other  # int, strided, half: nothing MKL packs


@needs_mkl
@pytest.mark.parametrize(("m", "k", "n", "by"), [(40, 12, 9, "rows"), (3, 12, 40, "columns")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_large_gemms_split_into_row_or_column_blocks_over_threads(m, k, n, by, accumulate, monkeypatch):
    """Where MKL runs no OpenMP of its own (another threading layer), the backend splits a large GEMM itself."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)  # every GEMM counts as large
    monkeypatch.setattr(MKL, "openmp", None)
    be = mkl_backend(most=2)
    calls = []
    real = MKL.gemm
    monkeypatch.setattr(MKL, "gemm", lambda a, b, out, acc: calls.append(out.shape) or real(a, b, out, acc))
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(m, k)), rng.normal(size=(n, k)).T
    out = rng.normal(size=(m, n))
    out0 = out.copy()
    be.matmul(a, b, out, accumulate=accumulate)
    np.testing.assert_allclose(out, reference(a, b, out0, accumulate), rtol=1e-12, atol=1e-12)
    half = (m // 2, n) if by == "rows" else (m, n // 2)
    assert sorted(calls) == sorted([half, (m - half[0], n) if by == "rows" else (m, n - half[1])])
    assert be._gemm_pool is not None  # the second block ran in the backend's thread


@needs_mkl
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(("a_layout", "b_layout"), [("C", "C"), ("F", "ld"), ("ld", "F")])
@pytest.mark.parametrize("accumulate", [False, True])
def test_large_gemms_run_on_mkls_openmp_threads_and_leave_no_setting_behind(dtype, a_layout, b_layout, accumulate,
                                                                           monkeypatch):  # fmt: skip
    """A large GEMM runs whole on MKL's own threads: during the call the thread's MKL count is the backend's
    threads and OpenMP's blocktime 0 (no thread spins after it); after it both are as they were. The product
    as float64's."""
    if MKL.openmp is None:
        pytest.skip("this MKL runs no Intel OpenMP (another threading layer)")
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)  # every GEMM counts as large
    be = mkl_backend(most=2)
    seen = []
    char = np.dtype(dtype).char
    real = MKL._gemm[char]

    def spy(*args):
        seen.append((MKL.lib.MKL_Get_Max_Threads(), MKL.openmp.kmp_get_blocktime()))
        real(*args)

    monkeypatch.setitem(MKL._gemm, char, spy)
    rng = np.random.default_rng(11)
    a, b = operand(rng, (70, 40), dtype, a_layout), operand(rng, (40, 30), dtype, b_layout)
    out = rng.normal(size=(70, 30)).astype(dtype)
    out0 = out.copy()
    before = (MKL.lib.MKL_Get_Max_Threads(), MKL.openmp.kmp_get_blocktime())
    be.matmul(a, b, out, accumulate=accumulate)
    tol = tolerance(np.dtype(dtype), 40)
    np.testing.assert_allclose(out, reference(a, b, out0, accumulate), rtol=tol, atol=tol)
    assert seen == [(2, 0)]  # one call, whole, on two threads that sleep right after
    assert (MKL.lib.MKL_Get_Max_Threads(), MKL.openmp.kmp_get_blocktime()) == before
    assert be._gemm_pool is None  # no split over the backend's threads


@needs_mkl
def test_a_users_kmp_blocktime_is_left_as_it_is(monkeypatch):
    """Where the user set KMP_BLOCKTIME, a large GEMM runs on MKL's threads with the blocktime untouched."""
    if MKL.openmp is None:
        pytest.skip("this MKL runs no Intel OpenMP (another threading layer)")
    monkeypatch.setenv("KMP_BLOCKTIME", "50")
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)
    seen, real = [], MKL._gemm["d"]
    monkeypatch.setitem(MKL._gemm, "d", lambda *args: seen.append(MKL.openmp.kmp_get_blocktime()) or real(*args))
    before = MKL.openmp.kmp_get_blocktime()
    a = np.ones((8, 8))
    out = np.empty((8, 8))
    mkl_backend(most=2).matmul(a, a, out)
    assert seen == [before] and MKL.openmp.kmp_get_blocktime() == before
    np.testing.assert_array_equal(out, np.full((8, 8), 8.0))


@needs_mkl
@pytest.mark.parametrize("layer", ["SEQUENTIAL", "INTEL"])
def test_mkls_own_threads_only_under_its_intel_threading_layer(layer):
    """Intel OpenMP loaded by something else (here by hand, before MKL) does not mean MKL threads with it: under
    the sequential layer the backend splits large GEMMs itself."""
    code = (
        "import ctypes, glob, os, sys; "
        "ctypes.CDLL(glob.glob(os.path.join(sys.prefix, 'lib', 'libiomp5.so'))[0]); "
        "from gpubptt.backend.numpy_backend import NumpyBackend; be = NumpyBackend(blas='mkl'); "
        "print(be.mkl.openmp is not None, be.blas_library)"
    )
    env = {**os.environ, "MKL_THREADING_LAYER": layer}
    if not glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so")):
        pytest.skip("no libiomp5 in this environment")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    threaded = layer == "INTEL"
    assert out.startswith(str(threaded))
    assert ("MKL's OpenMP threads" if threaded else "gpubptt's threads") in out


@needs_mkl
def test_no_split_inside_concurrent_jobs_or_with_one_thread(monkeypatch):
    """run_concurrently's jobs are the parallelism already: their GEMMs run whole, as on a one-thread process."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)
    be = mkl_backend(most=2)
    calls = []
    real = MKL.gemm
    monkeypatch.setattr(MKL, "gemm", lambda a, b, out, acc: calls.append(out.shape) or real(a, b, out, acc))
    rng = np.random.default_rng(6)
    pairs = [(rng.normal(size=(20, 6)), rng.normal(size=(6, 8)), np.empty((20, 8))) for _ in range(2)]
    be.run_concurrently([lambda p=p: be.matmul(*p) for p in pairs])
    be.blas_threads.most = 1
    be.matmul(*pairs[0])
    assert calls == [(20, 8)] * 3
    for a, b, out in pairs:
        np.testing.assert_allclose(out, a @ b, rtol=1e-12)


def test_gpubptt_blas_picks_the_library_and_refuses_what_it_cannot_give(monkeypatch):
    monkeypatch.setenv("GPUBPTT_BLAS", "numpy")
    be = NumpyBackend()
    assert be.blas == "numpy" and be.mkl is None
    monkeypatch.setenv("GPUBPTT_BLAS", "openblas")
    with pytest.raises(gpubptt.InputError, match=r"GPUBPTT_BLAS='openblas'.*auto, mkl, numpy"):
        NumpyBackend()
    monkeypatch.setattr(numpy_backend, "load_mkl", lambda: (None, "no libmkl_rt here"))
    monkeypatch.setenv("GPUBPTT_BLAS", "mkl")
    with pytest.raises(
        gpubptt.BackendUnavailableError, match=r"no libmkl_rt here.*pip install mkl.*pip install -e '\.\[mkl\]'"
    ):
        NumpyBackend()
    monkeypatch.setenv("GPUBPTT_BLAS", "auto")
    assert NumpyBackend().blas == "numpy"  # auto: NumPy's own BLAS where MKL is absent
    if MKL is not None:
        monkeypatch.undo()
        assert NumpyBackend(blas="auto").blas == "mkl" and NumpyBackend("mkl").blas_library.startswith("MKL 20")


@needs_mkl
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradients_with_packed_step_gemms_equal_numpys_own_blas_in_float64(cell, monkeypatch):
    """Shapes at which MKL runs and packs W (B·H·G·H above ``MKL_MIN_FLOPS``), float64: the gradients equal
    those of the same model on NumPy's own BLAS (which is checked against references elsewhere) to rounding."""
    T, B, D, H, K = 5, 64, 4, 192 if cell == "rnn" else 128, 5  # (T−1)·B ≥ PACK_MIN_ROWS: the steps repay a pack
    packs = []
    be = mkl_backend(most=1)
    real_pack = be.pack
    monkeypatch.setattr(
        be, "pack", lambda b, rows, steps=None, **kw: packs.append(type(p := real_pack(b, rows, steps, **kw))) or p
    )
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    grads = {}
    for name, backend in (("mkl", be), ("numpy", NumpyBackend(blas="numpy"))):
        model = gpubptt.RNN(D, H, K, cell=cell, backend=backend, dtype="float64", seed=0, bias=True)
        grads[name] = model.loss_and_grads(x, y)
    assert packs.count(PackedMatrix) == 2  # forward and backward each packed W once
    assert grads["mkl"][0] == pytest.approx(grads["numpy"][0], rel=1e-12)
    for k, g in grads["numpy"][1].items():
        np.testing.assert_allclose(grads["mkl"][1][k], g, rtol=1e-10, atol=1e-12, err_msg=k)


@needs_mkl
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradients_with_every_large_gemm_on_mkls_threads_equal_numpys_own_blas_in_float64(cell, monkeypatch):
    """Every GEMM of a float64 model counted as large (on MKL's OpenMP threads where MKL runs them, else split),
    two layers, bidirectional: loss and gradients equal those on NumPy's own BLAS to rounding."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)
    threaded, real = [], MKL.gemm_threaded
    monkeypatch.setattr(MKL, "gemm_threaded", lambda *args: threaded.append(real(*args)) or threaded[-1])
    T, B, D, H, K = 5, 6, 4, 7, 5
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    grads = {}
    for name, backend in (("mkl", mkl_backend(most=2)), ("numpy", NumpyBackend(blas="numpy"))):
        model = gpubptt.RNN(D, H, K, cell=cell, num_layers=2, bidirectional=True, backend=backend, dtype="float64",
                            seed=3)  # fmt: skip
        grads[name] = model.loss_and_grads(x, y)
    assert threaded and all(threaded) == (MKL.openmp is not None)  # every large GEMM whole on MKL's threads
    assert grads["mkl"][0] == pytest.approx(grads["numpy"][0], rel=1e-12)
    for k, g in grads["numpy"][1].items():
        np.testing.assert_allclose(grads["mkl"][1][k], g, rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("choice", ["numpy", "auto"])
def test_info_names_the_blas_that_runs_the_gemms(choice, monkeypatch):
    be = get_backend("numpy")
    numpy_blas = NumpyBackend(blas="numpy").blas_library  # as threadpoolctl reports NumPy's BLAS
    if choice == "numpy":
        monkeypatch.setattr(be, "blas_library", numpy_blas)
    result = CliRunner().invoke(app, ["info", "--backend", "numpy", "--json"])
    assert result.exit_code == 0, result.output
    in_use = json.loads(result.stdout)["blas"]["in_use"]
    assert in_use == be.blas_library
    asked = os.environ.get("GPUBPTT_BLAS", "").strip().lower() or "auto"  # what the cached backend was made with
    if choice == "auto" and MKL is not None and asked != "numpy":
        assert in_use.startswith("MKL 20") and "one thread per small GEMM" in in_use
    else:
        assert in_use == numpy_blas and not in_use.startswith("MKL")


@needs_mkl
def test_a_pack_is_made_only_for_enough_steps_and_not_for_a_gemm_that_splits(monkeypatch):
    """A weight used by one step (sampling) stays unpacked; so does one whose GEMM ``matmul`` splits over threads."""
    monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    be = mkl_backend(most=2)
    rng = np.random.default_rng(9)
    b = rng.normal(size=(6, 5))
    assert be.pack(b, 1, steps=1) is b  # 1 row × 1 step: the pack would cost more than it saves
    assert be.pack(b, 2, steps=numpy_backend.PACK_MIN_ROWS // 2 - 1) is b
    assert isinstance(be.pack(b, 2), PackedMatrix)  # steps None: many
    handle = be.pack(b, 2, steps=numpy_backend.PACK_MIN_ROWS // 2)  # (the thread's latest pack: valid)
    assert isinstance(handle, PackedMatrix)
    a, out = rng.normal(size=(2, 6)), np.empty((2, 5))
    be.matmul(a, handle, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    monkeypatch.setattr(numpy_backend, "BLAS_THREADED_FLOPS", 1)  # every GEMM counts as large: split, not packed
    assert be.pack(b, 2) is b
    assert isinstance(mkl_backend(most=1).pack(b, 2), PackedMatrix)  # one thread: no split, so packed


def test_mkl_num_threads_caps_the_threads_of_a_large_gemm():
    """MKL reads none of OpenBLAS's variables: the fewest threads any thread variable asks for counts."""
    assert numpy_backend.most_threads(2, 2, {"MKL_NUM_THREADS": "1"}) == 1
    assert numpy_backend.most_threads(4, 8, {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "2"}) == 2
    assert numpy_backend.most_threads(4, 8, {"OPENBLAS_NUM_THREADS": "4"}) == 4
    assert numpy_backend.most_threads(4, 8, {"MKL_NUM_THREADS": "x"}) == 4  # not a number: the BLAS's own count
    assert numpy_backend.most_threads(4, 8, {}) == 4


def test_a_bad_blas_argument_is_named_as_the_argument(monkeypatch):
    monkeypatch.delenv("GPUBPTT_BLAS", raising=False)
    with pytest.raises(gpubptt.InputError, match=r"^blas='openblas' is not a BLAS choice"):
        NumpyBackend(blas="openblas")


@needs_mkl
def test_each_mkl_call_runs_on_one_thread_and_puts_the_threads_setting_back(monkeypatch):
    from gpubptt.backend._mkl import Mkl

    mkl = Mkl(MKL.lib, MKL.path)
    local = threading.local()  # MKL's per-thread setting, as MKL_Set_Num_Threads_Local keeps it (0: global)
    asked = []

    def set_local(n):
        previous = getattr(local, "n", 0)
        local.n = n
        asked.append(n)
        return previous

    monkeypatch.setattr(mkl.lib, "MKL_Set_Num_Threads_Local", set_local)
    rng = np.random.default_rng(10)
    a, b, out = rng.normal(size=(7, 5)), rng.normal(size=(5, 3)), np.empty((7, 3))
    assert mkl.gemm(a, b, out, False)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    assert asked == [1, 0] and local.n == 0  # one thread for the call, then the global setting again
    local.n = 3  # a thread that set its own count keeps it
    packed = mkl.packed(b, 7, PackSlot())
    assert packed is not None and mkl.compute(a, packed, out, False)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)
    assert asked == [1, 0, 1, 3, 1, 3] and local.n == 3
    monkeypatch.setattr(numpy_backend, "_choose_mkl", lambda blas: mkl)
    assert "one thread per small GEMM" in NumpyBackend().blas_library

    def interrupted(*args):  # a Ctrl-C raised as the MKL call returns
        raise KeyboardInterrupt

    runs = [("_gemm", lambda: mkl.gemm(a, b, out, False)), ("_compute", lambda: mkl.compute(a, packed, out, False)),
            ("_pack", lambda: mkl.packed(b, 7, PackSlot()))]  # fmt: skip
    for call, run in runs:
        monkeypatch.setitem(getattr(mkl, call), "d", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run()
        assert local.n == 3, call  # the thread's own setting, put back all the same


def test_an_interrupted_gemm_never_holds_the_blas_thread_count():
    threads = NumpyBackend(blas="numpy").blas_threads
    if threads._set is None:
        pytest.skip("this NumPy's BLAS threads cannot be set")
    threads.leave()  # no enter counted on this thread (an interrupt before it): nothing to release
    assert threads._in_flight == 0
    threads.enter(1)
    threads.leave()
    threads.use(2)  # no GEMM in flight: the count follows again
    assert threads.current == 2 or not threads.enabled


@needs_mkl
def test_loading_mkl_leaves_a_torch_imported_afterwards_its_own_threads():
    """MKL's process-wide settings stay as they were: a torch imported after gpubptt loaded MKL sizes its
    thread pool as it does alone (it binds its MKL calls to the library loaded first)."""
    pytest.importorskip("torch")
    code = "import torch; print(torch.get_num_threads(), torch.__config__.parallel_info().count('threads() : 1'))"
    gemm = (
        "import numpy as np; from gpubptt.backend import get_backend; be = get_backend('numpy'); "
        "a = np.ones((64, 64), np.float32); assert be.mkl.gemm(a, a, np.empty_like(a), False); "
    )
    env = {**os.environ, "GPUBPTT_BLAS": "mkl"}
    runs = {
        "alone": code,
        "a gpubptt GEMM, then torch imported": gemm + code,
        "torch imported, a gpubptt GEMM, then torch used": "import torch; " + gemm + code,
    }
    out = {k: subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True, env=env).stdout
           for k, c in runs.items()}  # fmt: skip
    assert len(set(out.values())) == 1, out


GEMM_SCRIPT = """
import numpy as np
from gpubptt.backend.numpy_backend import NumpyBackend
be = NumpyBackend(blas="mkl")
rng = np.random.default_rng(0)
a, b = rng.normal(size=(256, 512)).astype(np.float32), rng.normal(size=(512, 384)).astype(np.float32)
out = np.empty((256, 384), np.float32)
be.matmul(a, b, out)
err = np.abs(out - a.astype(np.float64) @ b.astype(np.float64)).max()
print(be.mkl is not None, float(err))
"""


@needs_mkl
@pytest.mark.parametrize("env", [{"MKL_INTERFACE_LAYER": "ILP64"}, {"MKL_THREADING_LAYER": "TBB"}])
def test_mkl_environment_variables_leave_the_gemms_right_not_a_crashed_process(env):
    """ILP64 made MKL read the 32-bit ints of the prototypes as 64-bit ones (the process died at the first GEMM);
    the TBB layer's library sat beside MKL's, where the loader does not look (MKL ended the process)."""
    run = subprocess.run(
        [sys.executable, "-c", GEMM_SCRIPT], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    used, err = run.stdout.split()
    assert used == "True" and float(err) < 1e-3


@needs_mkl
def test_mkl_already_on_lp64_with_gnu_threads_is_used():
    """MKL_INTERFACE_LAYER=LP64,GNU (2) with MKL initialised by an earlier user in the process: 32-bit ints all the
    same, but the check took any layer other than 0 for ILP64 and left MKL unused."""
    script = (
        "import ctypes, sys, os\n"
        "from gpubptt.backend import _mkl\n"
        "ctypes.CDLL(_mkl._candidates()[0]).MKL_Get_Max_Threads()  # an earlier MKL user\n" + GEMM_SCRIPT
    )
    env = {**os.environ, "MKL_INTERFACE_LAYER": "LP64,GNU", "GPUBPTT_BLAS": "mkl"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    used, err = run.stdout.split()
    assert used == "True" and float(err) < 1e-3
