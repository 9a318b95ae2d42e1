"""The NumPy backend's BLAS threads per GEMM shape: one thread for the per-step GEMMs, the rank's share of
the cores for the batched ones; the thread count in force is read back through threadpoolctl (the
library's own report), and results are checked against a float64 product."""

from __future__ import annotations

import os

import numpy as np
import pytest

import gpubptt
from gpubptt.backend.numpy_backend import BLAS_THREADED_FLOPS, NumpyBackend, most_threads

threadpoolctl = pytest.importorskip("threadpoolctl")
be = NumpyBackend(blas="numpy")  # NumPy's own BLAS, whose threads these steer (MKL's GEMMs: tests/test_mkl.py)
if be.blas_threads.library == "unknown":
    pytest.skip("threadpoolctl finds no BLAS to steer in this process", allow_module_level=True)


def threads_in_force() -> int:
    """The BLAS thread count NumPy's BLAS reports now (threadpoolctl, independent of gpubptt's bookkeeping)."""
    libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    lib = next((c for c in libs if "numpy" in (c.filepath or "")), libs[0])
    return int(lib.num_threads)


@pytest.mark.parametrize("accumulate", [False, True])
def test_small_gemm_runs_on_one_thread_large_on_the_rank_share_and_both_match_float64(accumulate):
    rng = np.random.default_rng(0)
    side = round((BLAS_THREADED_FLOPS / 2) ** (1 / 3)) + 8  # just above the threshold, as a cube
    for m, k, n, expected in ((8, 16, 48, 1), (side, side, side, be.blas_threads.most)):
        a, b = rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)
        out = rng.normal(size=(m, n)).astype(np.float32)
        ref = a.astype(np.float64) @ b.T.astype(np.float64) + (out.astype(np.float64) if accumulate else 0)
        be.matmul(a, b.T, out, accumulate=accumulate)
        assert threads_in_force() == expected, (m, k, n)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


def test_training_steps_leave_per_step_gemms_single_threaded_and_gradients_unchanged():
    """A GRU's loss_and_grads (per-step GEMMs last in its backward) ends on one thread; its gradients equal
    those computed with the thread count left to the BLAS (the thread split changes no summation we rely on
    beyond rounding)."""
    rng = np.random.default_rng(1)
    model = gpubptt.RNN(5, 16, 7, cell="gru", backend=be, seed=0)
    x, y = rng.normal(size=(6, 3, 5)).astype(np.float32), rng.integers(0, 7, (6, 3))
    be.blas_threads.use(be.blas_threads.most)
    loss, grads = model.loss_and_grads(x, y)
    assert threads_in_force() == 1  # every GEMM of this tiny model is below the threshold
    model64 = gpubptt.RNN.from_params({k: v.astype(np.float64) for k, v in model.params.items()}, backend=be)
    loss64, grads64 = model64.loss_and_grads(x.astype(np.float64), y)
    assert loss == pytest.approx(loss64, rel=1e-5)
    for name, g in grads.items():
        np.testing.assert_allclose(g, grads64[name], rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    ("library_threads", "cores", "environ", "expected"),
    [
        (2, 2, {}, 2),  # one process: all cores
        (8, 2, {}, 2),  # a BLAS that counts more threads than usable cores: the cores
        (2, 2, {"MPI_LOCALNRANKS": "2"}, 1),  # two MPI ranks on a 2-core host (MPICH's Hydra)
        (16, 16, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4),  # Open MPI, 4 ranks on 16 cores
        (2, 2, {"MPI_LOCALNRANKS": "4"}, 1),  # more ranks than cores: never below one
        (3, 16, {"OPENBLAS_NUM_THREADS": "3", "MPI_LOCALNRANKS": "4"}, 3),  # the user's variable wins
        (2, 2, {"MPI_LOCALNRANKS": "not a number"}, 2),  # an unreadable launcher variable is ignored
    ],
)
def test_large_gemm_threads_follow_the_cores_the_ranks_and_the_users_variables(
    library_threads, cores, environ, expected
):
    assert most_threads(library_threads, cores, environ) == expected


def test_thread_count_changes_only_while_no_other_gemm_runs():
    """The count is process-wide: while one GEMM is in flight (entered, not left), another thread's GEMM
    asking for a different count leaves it as it is; once none runs, the next one sets its own."""
    bt = be.blas_threads
    if bt.most < 2:
        pytest.skip("one BLAS thread at most here: nothing to switch between")
    bt.enter(1)  # a small GEMM in flight
    try:
        assert threads_in_force() == 1
        bt.enter(bt.most)  # a large GEMM from another thread meanwhile
        assert threads_in_force() == 1
        bt.leave()
    finally:
        bt.leave()
    bt.use(bt.most)
    assert threads_in_force() == bt.most


def test_a_backend_made_after_another_ran_a_gemm_sizes_its_threads_from_the_library_as_found():
    """The first backend's small GEMM lowers the BLAS to one thread; a backend made after read that as the BLAS's
    own count and kept its large GEMMs and batch halves on one thread."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from gpubptt.backend.numpy_backend import NumpyBackend\n"
        "a = NumpyBackend(blas='numpy'); first = a.blas_threads.most\n"
        "x = np.ones((4, 4)); a.matmul(x, x, np.empty((4, 4)))\n"
        "b = NumpyBackend(blas='numpy'); print(first, b.blas_threads.most)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = map(int, run.stdout.split())
    assert second == first
