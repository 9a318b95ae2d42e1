"""Real multi-process runs under ``mpiexec -n 2`` (the ``gpubptt[mpi]`` extra): each a subprocess with a timeout.

Skipped, with the reason, where mpi4py or mpiexec is missing; ``make test`` installs both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gpubptt.cli import app

TIMEOUT = 60  # seconds per mpiexec job: a hung collective fails the test instead of the suite


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"  # the mpich wheel puts it in the venv's bin/
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _skip_reason() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if _mpiexec() is None:
        return "no mpiexec on PATH or beside the interpreter (pip install mpich brings MPICH's)"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

TINY = ["--hidden", "16", "--batch", "5", "--chunk", "16", "--dtype", "float64", "--backend", "numpy"]


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    return {**env, "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": root + (os.pathsep + path if path else "")}


def mpiexec(*commands: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``mpiexec -n 1 cmd1 : -n 1 cmd2`` (one rank per command; one command given twice is ``-n 2``)."""
    argv = [_mpiexec()]
    for i, cmd in enumerate(commands):
        argv += ([":"] if i else []) + ["-n", "1", sys.executable, *cmd]
    return subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def _cli(*args) -> list[str]:
    return ["-m", "gpubptt", "train", *map(str, args)]


def _one_process(*args) -> None:
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output


def _assert_same_run(a: Path, b: Path, rtol: float) -> None:
    got, ref = np.load(a), np.load(b)
    assert sorted(got.files) == sorted(ref.files)
    for k in ref.files:
        if ref[k].dtype.kind == "f":
            np.testing.assert_allclose(got[k], ref[k], rtol=rtol, atol=rtol * max(1.0, np.abs(ref[k]).max()), err_msg=k)
        elif k != "meta":
            assert np.array_equal(got[k], ref[k]), k


def test_mpi_communicator_sums_and_broadcasts_over_two_processes(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from gpubptt.distributed import make_communicator
        comm = make_communicator("mpi")
        mine = np.random.default_rng(comm.rank).standard_normal(1000)
        a, b = mine.copy(), mine.copy()
        comm.allreduce(a)
        comm.broadcast(b, root=1)
        comm.barrier()
        ref = sum(np.random.default_rng(r).standard_normal(1000) for r in range(comm.size))
        assert comm.size == 2 and np.allclose(a, ref, rtol=1e-14), "allreduce"
        assert np.array_equal(b, np.random.default_rng(1).standard_normal(1000)), "broadcast"
        sys.stdout.write(f"ok {comm.rank} {comm.local_rank}\\n"); sys.stdout.flush()  # one write: lines stay whole
        """
    )
    result = mpiexec(["-c", script], ["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split("\n")[:-1]) == ["ok 0 0", "ok 1 1"]


def test_two_ranks_train_the_model_of_one_process_and_resume_across_rank_counts(tmp_path):
    """2 ranks (uneven: 3 + 2 streams) = 1 process; a 2-rank checkpoint resumes in 1 process and vice versa."""
    ref40, ref20 = tmp_path / "ref40.npz", tmp_path / "ref20.npz"
    _one_process(*TINY, "--steps", 40, "--eval-every", 10, "--checkpoint", ref40)
    _one_process(*TINY, "--steps", 20, "--eval-every", 10, "--checkpoint", ref20)
    two = _cli(*TINY, "--steps", 40, "--eval-every", 10, "--checkpoint", "two.npz", "--distributed", "mpi")
    result = mpiexec(two, two, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("held-out loss") == 1  # only rank 0 prints
    _assert_same_run(tmp_path / "two.npz", ref40, rtol=1e-9)

    # a 2-rank run stopped at step 20 (mid-sequence: the carried state is in the file) resumes in one process
    half = _cli(*TINY, "--steps", 20, "--eval-every", 10, "--checkpoint", "half.npz", "--distributed", "mpi")
    assert mpiexec(half, half, cwd=tmp_path).returncode == 0
    assert "carry.s" in np.load(tmp_path / "half.npz").files
    _one_process("--resume", "--steps", 40, "--eval-every", 10, "--checkpoint", tmp_path / "half.npz")
    _assert_same_run(tmp_path / "half.npz", ref40, rtol=1e-9)

    # and a one-process checkpoint resumes under two ranks
    more = _cli("--resume", "--steps", 40, "--eval-every", 10, "--checkpoint", "ref20.npz", "--distributed", "mpi")
    result = mpiexec(more, more, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_same_run(ref20, ref40, rtol=1e-9)


def _training_script(fail: str) -> str:
    return textwrap.dedent(
        f"""
        import os, signal
        from gpubptt.distributed import DataParallel, install_abort_hook, make_communicator
        from gpubptt.training.run import new_run
        from gpubptt.training.loop import train
        comm = make_communicator("mpi")
        install_abort_hook(comm)
        run = new_run({{"hidden": 8, "batch": 4, "chunk": 8}}, backend="numpy", steps=10**6, eval_every=0)
        dp = DataParallel(run.model, comm, batch_size=4)
        def callback(ev):
            if comm.rank == 1 and ev.step == 3:
                {fail}
        train(dp, dp.shard_data(run.data), run.optimizer, dp.local_config(run.config), callback=callback,
              evaluator=dp.evaluate)
        """
    )


@pytest.mark.parametrize(
    "fail,message",
    [
        ("raise RuntimeError('rank one gave up at step 3')", ("rank one gave up at step 3", "rank 1 of 2 failed")),
        ("os.kill(os.getpid(), signal.SIGKILL)", ()),  # dies without a word: the launcher ends the rest
    ],
    ids=["raises", "killed"],
)
def test_a_rank_that_raises_or_dies_ends_the_job_instead_of_leaving_the_other_waiting(tmp_path, fail, message):
    script = _training_script(fail)
    result = mpiexec(["-c", script], ["-c", script], cwd=tmp_path)  # rank 0 would train 10**6 steps alone
    assert result.returncode != 0
    assert all(m in result.stderr for m in message), result.stderr


def test_a_cli_rank_that_calls_sys_exit_mid_run_ends_the_job(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        from gpubptt.cli import app
        from gpubptt.model import RNN
        real, calls = RNN.loss_and_grads, []
        def loss_and_grads(self, *args, **kwargs):  # something below the command exits on rank 1's second step
            calls.append(1)
            if len(calls) == 2 and "rank1" in sys.argv[-1]:
                sys.exit(5)
            return real(self, *args, **kwargs)
        RNN.loss_and_grads = loss_and_grads
        app(sys.argv[1:-1])
        """
    )
    cmd = ["train", *map(str, TINY), "--steps", "10000", "--checkpoint", "c.npz", "--distributed", "mpi"]
    result = mpiexec(["-c", script, *cmd, "rank0"], ["-c", script, *cmd, "rank1"], cwd=tmp_path)  # no hang: ends
    assert result.returncode != 0 and "rank 1 of 2 stopped (exit status 5): ending the job" in result.stderr


def test_more_ranks_than_streams_are_refused_before_training(tmp_path):
    cmd = _cli(*TINY[:2], "--batch", 1, "--backend", "numpy", "--steps", 5, "--checkpoint", "c.npz", "--distributed")
    result = mpiexec([*cmd, "mpi"], [*cmd, "mpi"], cwd=tmp_path)
    assert result.returncode != 0
    assert "2 ranks need at least 2 streams" in result.stderr and "B=1" in result.stderr
    assert not (tmp_path / "c.npz").exists()


def test_ranks_started_with_different_options_are_refused(tmp_path):
    base = [*TINY, "--steps", 5, "--checkpoint", "c.npz", "--distributed", "mpi"]
    refused = "were started with options or a gpubptt version different from rank 0's"
    result = mpiexec(_cli(*base, "--seed", 0), _cli(*base, "--seed", 1), cwd=tmp_path)
    assert result.returncode != 0 and refused in result.stderr
    assert not (tmp_path / "c.npz").exists()
    # --early-stop on one rank only: that rank would stop and leave the other in its next collective
    result = mpiexec(_cli(*base, "--early-stop", 1), _cli(*base), cwd=tmp_path)
    assert result.returncode != 0 and refused in result.stderr
    # resumed from two files of one shape but other settings (a stale copy on one node): refused, not mixed
    for name, more in (("a.npz", ()), ("b.npz", ("--optimizer", "sgd", "--lr", 0.5))):
        _one_process(*TINY, "--steps", 2, "--checkpoint", tmp_path / name, *more)
    again = ["--resume", "--steps", 4, "--distributed", "mpi", "--backend", "numpy"]
    result = mpiexec(_cli(*again, "--checkpoint", "a.npz"), _cli(*again, "--checkpoint", "b.npz"), cwd=tmp_path)
    assert result.returncode != 0 and refused in result.stderr
