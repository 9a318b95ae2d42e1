"""The two directions of a bidirectional layer run at once on the NumPy backend (``Backend.run_concurrently``):
gradients against central differences of an independent float64 reference, with the concurrent schedule forced
on (as on any machine with two cores or more), and the job runner's error handling."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import gpubptt
from gpubptt.backend.numpy_backend import NumpyBackend
from tests.reference import numeric, ref_gated_loss, ref_stack_loss

T, B, D, H, K = 5, 3, 4, 3, 5


def concurrent_backend() -> NumpyBackend:
    """A NumPy backend of its own that runs jobs in threads whatever the core count here."""
    be = NumpyBackend()
    be.blas_threads.most = max(2, be.blas_threads.most)
    return be


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_directions_at_once_match_central_differences_of_the_reference(cell):
    be = concurrent_backend()
    model = gpubptt.RNN(D, H, K, cell=cell, num_layers=2, bidirectional=True, bias=True, backend=be, seed=3,
                        dtype="float64")  # fmt: skip
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(T, B, D)), rng.integers(0, K, (T, B))
    lengths = np.array([5, 2, 4])
    loss, grads = model.loss_and_grads(x, y, lengths=lengths)
    assert be._pool is not None  # the directions did run in two threads
    p = {k: np.array(v) for k, v in model.params.items()}
    if cell == "rnn":
        f = lambda: ref_stack_loss(p, x, y, None, lengths, num_layers=2, bidirectional=True)  # noqa: E731
    else:
        f = lambda: ref_gated_loss(cell, p, x, y, None, None, lengths, num_layers=2, bidirectional=True)  # noqa: E731
    assert loss == pytest.approx(f(), rel=1e-12)
    for name, arr in p.items():
        idx = rng.choice(arr.size, min(arr.size, 8), replace=False)  # a sample of each array's coordinates
        np.testing.assert_allclose(grads[name].reshape(-1)[idx], numeric(f, arr, idx), rtol=1e-6, atol=1e-8,
                                   err_msg=name)  # fmt: skip


def test_run_concurrently_runs_every_job_and_raises_the_first_error_after_all_finish():
    be = concurrent_backend()
    most = be.blas_threads.most
    ran, started = [], threading.Event()

    def slow() -> None:
        started.wait(5)
        ran.append("slow")

    def failing() -> None:
        started.set()
        ran.append("failing")
        raise ValueError("job failed")

    with pytest.raises(ValueError, match="job failed"):
        be.run_concurrently([slow, failing])
    assert sorted(ran) == ["failing", "slow"]  # the other job finished before the error came out
    assert be.blas_threads.most == most  # the BLAS threads for large GEMMs are back as they were


def test_a_thread_outside_the_jobs_keeps_the_full_thread_count():
    """Only the jobs' own threads run their GEMMs on one BLAS thread: another thread sharing the backend
    meanwhile keeps splitting its large GEMMs (the count was once set to 1 for the whole backend)."""
    be = concurrent_backend()
    most = be.blas_threads.most
    seen, inside, release = {}, threading.Event(), threading.Event()

    def job() -> None:
        seen["job"] = be.blas_threads.most
        inside.set()
        release.wait(5)

    def other_job() -> None:
        seen["other job"] = be.blas_threads.most

    runner = threading.Thread(target=be.run_concurrently, args=([job, other_job],))
    runner.start()
    assert inside.wait(5)
    seen["outside"] = be.blas_threads.most
    release.set()
    runner.join(5)
    assert seen == {"job": 1, "other job": 1, "outside": most} and most >= 2
    assert be.blas_threads.most == most
