"""No hung job: under ``mpiexec`` a rank that refuses its options before training makes every rank stop, together.

Real launches (MPMD: ``mpiexec -n 1 cmd1 : -n 1 cmd2``), each under a timeout, with each rank's exit
status recorded by a shell around it; the meeting itself on fake ranks.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpubptt.distributed import allgather_text, run_ranks

from .test_distributed_mpi import TIMEOUT, TINY, _env, _mpiexec, _skip_reason

needs_mpi = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _launch(*commands: list[str], cwd: Path) -> tuple[list[int], str]:
    """``mpiexec -n 1 sh -c 'cmd0; echo $? > rc0' : -n 1 ...``: every rank's exit status and the job's stderr."""
    argv = [_mpiexec()]
    for r, cmd in enumerate(commands):
        line = shlex.join([sys.executable, "-m", "gpubptt", "train", *map(str, cmd)])
        argv += ([":"] if r else []) + ["-n", "1", "sh", "-c", f"{line}; echo $? > rc{r}"]
    result = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    codes = [int((cwd / f"rc{r}").read_text()) for r in range(len(commands))]
    return codes, result.stderr


@needs_mpi
def test_a_rank_started_without_distributed_stops_every_rank_with_its_message(tmp_path):
    base = [*TINY, "--steps", 5, "--checkpoint", "c.npz"]
    codes, err = _launch([*base, "--distributed", "mpi"], [*base, "--distributed", "none"], cwd=tmp_path)
    assert codes == [2, 2], err
    message = "started by an MPI launcher (PMI_SIZE), but --distributed is none"
    assert "rank 1 of 2 refused to start: this process is one of 2" in err  # rank 0 repeats rank 1's refusal
    assert err.count(message) == 2  # once from each rank
    assert not (tmp_path / "c.npz").exists()


@needs_mpi
def test_a_checkpoint_folder_missing_on_one_rank_stops_every_rank_before_work(tmp_path):
    base = [*TINY, "--steps", 5, "--distributed", "mpi"]
    codes, err = _launch([*base, "--checkpoint", "c.npz"], [*base, "--checkpoint", "elsewhere/c.npz"], cwd=tmp_path)
    assert codes == [2, 2], err
    assert "rank 1 of 2 refused to start: --checkpoint 'elsewhere/c.npz': folder" in err
    assert err.count("/elsewhere' does not exist") == 2  # rank 1's own error, and rank 0's report of it
    assert not (tmp_path / "c.npz").exists()


@needs_mpi
def test_ranks_that_pass_their_checks_train_as_before(tmp_path):
    base = [*TINY, "--steps", 3, "--eval-every", 3, "--checkpoint", "c.npz", "--distributed", "mpi"]
    codes, err = _launch(base, base, cwd=tmp_path)
    assert codes == [0, 0], err and (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("texts", [["", "", ""], ["ok", "", "rang 2: höhe ≠ 3\nzweite Zeile"], ["a" * 1000, "b"]])
def test_allgather_text_gives_every_rank_every_text_in_rank_order(texts):
    got = run_ranks(len(texts), lambda comm: allgather_text(comm, texts[comm.rank]))
    assert got == [texts] * len(texts)


def test_the_meeting_refuses_each_refusing_rank_and_a_rank_with_another_kind_than_rank_zeros():
    from gpubptt.cli._distributed import refusals_of

    assert refusals_of(["mpi\n", "mpi\n", "mpi\n"]) == {}
    got = refusals_of(["mpi\n", "nccl\n", "none\n!launched alone", "mpi\n!no folder\nsecond line"])
    assert got[2] == "launched alone" and got[3] == "no folder\nsecond line"
    assert got[1].startswith("started with --distributed nccl, rank 0 with --distributed mpi: start every rank")
    assert sorted(got) == [1, 2, 3]
