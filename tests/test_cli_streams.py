"""The command line when its streams misbehave: stderr closed, full or gone; stdout full, closed or unable to
encode; and the checks that keep a run's files safe (free space for the checkpoint, a bench result over a
checkpoint), and a stacked vanish whose Jacobians overflow.

Each run is a real process (``python -m gpubptt``): the streams are the process's own, redirected by a shell.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = ["train", "--task", "copy", "--steps", "2", "--hidden", "4", "--batch", "2"]
BENCH = ["bench", "--seq-lens", "4", "--hidden-sizes", "4", "--fixed-hidden", "4", "--fixed-seq-len", "4"]
BENCH += ["--batch", "2", "--repeats", "1", "--warmup", "0"]

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
needs_shell = pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell redirections")


def _sh(args: list[str], redirect: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m gpubptt ARGS REDIRECT`` through sh; stdout and stderr captured unless the redirect says."""
    line = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "gpubptt", *args]) + " " + redirect
    env = {**os.environ, **(env or {})}
    encoding = env.get("PYTHONIOENCODING", "utf-8")
    return subprocess.run(["sh", "-c", line], capture_output=True, encoding=encoding, cwd=cwd, env=env, timeout=300)


@needs_shell
def test_train_with_stderr_closed_trains_and_saves(tmp_path):
    r = _sh([*TRAIN, "--checkpoint", "ck.npz"], "2>&-", tmp_path)
    assert r.returncode == 0, r.stdout
    assert "checkpoint: ck.npz" in r.stdout
    assert (tmp_path / "ck.npz").is_file() and (tmp_path / "ck.best.npz").is_file()


@needs_shell
def test_bench_quiet_with_stderr_closed_writes_its_output(tmp_path):
    r = _sh([*BENCH, "-q", "--output", "f.json"], "2>&-", tmp_path)
    assert r.returncode == 0, r.stdout
    assert r.stdout == ""
    assert '"schema": "gpubptt.bench/1"' in (tmp_path / "f.json").read_text()


@needs_shell
def test_vanish_with_stderr_closed_prints_its_table(tmp_path):
    r = _sh(["vanish", "--seq-len", "4", "--hidden", "4", "--batch", "2"], "2>&-", tmp_path)
    assert r.returncode == 0
    assert "fit" in r.stdout


@needs_shell
@needs_dev_full
def test_train_with_stderr_full_trains_and_saves(tmp_path):
    r = _sh([*TRAIN, "--checkpoint", "ck.npz"], "2>/dev/full", tmp_path)
    assert r.returncode == 0, r.stdout
    assert "checkpoint: ck.npz" in r.stdout
    assert (tmp_path / "ck.npz").is_file()


@needs_shell
def test_train_whose_reader_goes_away_still_saves(tmp_path):
    """``2>&1 | head -1``: the header is read, then the pipe is gone; progress lines must not end the run."""
    line = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "gpubptt", *TRAIN, "--checkpoint", "ck.npz"])
    r = subprocess.run(
        ["bash", "-c", f"{line} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}"], capture_output=True, text=True,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.stdout.startswith("CopyTask(")
    assert "Traceback" not in r.stdout + r.stderr
    assert r.returncode == 3  # saved; only the summary on stdout was lost (the reader went away: no message)
    assert (tmp_path / "ck.npz").is_file()


LATIN1 = {"PYTHONIOENCODING": "latin-1"}


@needs_shell
def test_latin1_stdout_vanish_prints_escapes_not_a_traceback(tmp_path):
    r = _sh(["vanish", "--seq-len", "4", "--hidden", "4", "--batch", "2"], "", tmp_path, LATIN1)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "UnicodeEncodeError" not in r.stderr
    assert "\\u03c1" in r.stdout + r.stderr  # ρ, escaped


@needs_shell
def test_latin1_stdout_train_summary_and_bench_output(tmp_path):
    r = _sh([*TRAIN, "--checkpoint", "ck.npz"], "", tmp_path, LATIN1)
    assert r.returncode == 0, r.stderr
    assert "checkpoint: ck.npz" in r.stdout
    assert "\\u2192" in r.stderr  # the header's →
    r = _sh([*BENCH, "--output", "lb.json"], "", tmp_path, LATIN1)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert (tmp_path / "lb.json").is_file()


@needs_shell
def test_latin1_stdout_sample_prints(tmp_path):
    corpus = tmp_path / "t.txt"
    corpus.write_text("ρ∂× abc " * 200, encoding="utf-8")
    args = ["train", "--data", "t.txt", "--steps", "2", "--hidden", "4", "--batch", "2", "--checkpoint", "ck.npz"]
    assert _sh(args, "", tmp_path).returncode == 0
    r = _sh(["sample", "--checkpoint", "ck.npz", "--length", "40", "--prime", "ρ∂×"], "", tmp_path, LATIN1)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout.startswith("\\u03c1\\u2202×")  # the prime: ρ and ∂ escaped, × in latin-1


@needs_shell
@needs_dev_full
@pytest.mark.parametrize("args", [["--version"], ["train", "--help"], ["--help"]])
def test_version_and_help_to_a_full_stdout_are_one_error_line(tmp_path, args):
    r = _sh(args, ">/dev/full", tmp_path)
    assert r.returncode == 1
    assert r.stderr == "error: could not write to stdout: No space left on device\n"


@needs_shell
def test_version_to_a_closed_stdout_is_one_error_line(tmp_path):
    r = _sh(["--version"], ">&-", tmp_path)
    assert r.returncode == 1
    assert r.stderr == "error: could not write to stdout: stdout is closed\n"


def test_stack_report_of_an_overflowing_relu_stack_names_the_norms_non_finite():
    """W scaled to ρ = 1e30: products of 11 such steps overflow float64 (1e330), which the SVD cannot take."""
    import numpy as np

    import gpubptt
    from gpubptt.diagnostics.stack import stack_report, with_radius

    T, B = 12, 2
    model = gpubptt.RNN(4, 6, 4, num_layers=2, nonlinearity="relu", backend="numpy", dtype="float64", seed=0)
    model = with_radius(model, 1e30)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, (T, B)), rng.integers(0, 4, (T, B))
    with np.errstate(all="ignore"):
        report = stack_report(model, x, y)
    top = report.through_stack.per_layer[1].norms
    assert top[0] == pytest.approx(1.0)  # ∂s^top_end/∂s^top_end is the identity
    assert not np.isfinite(top[-1]) and not np.isfinite(report.through_stack.per_layer[0].norms[-1])


@needs_shell
def test_vanish_of_an_overflowing_relu_stack_prints_its_table(tmp_path):
    args = ["vanish", "--layers", "2", "--nonlinearity", "relu", "--scale", "1e30", "--seq-len", "12", "--hidden", "6"]
    r = _sh([*args, "--vocab", "4", "--batch", "2"], "", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "LinAlgError" not in r.stderr
    assert "top←l horizon" in r.stdout


@pytest.mark.parametrize("name", ["victim.npz", "renamed.bin"])
def test_bench_refuses_an_output_that_is_an_existing_numpy_archive(tmp_path, name):
    import numpy as np

    np.savez(tmp_path / "victim.npz", W=np.eye(3))  # a checkpoint stands in: any NumPy archive
    (tmp_path / "victim.npz").rename(tmp_path / name)
    before = (tmp_path / name).read_bytes()
    r = _sh([*BENCH, "--output", name], "", tmp_path)
    assert r.returncode == 2
    assert r.stderr == (
        f"error: --output {name!r} exists and is a NumPy or zip archive (a checkpoint?); bench would replace it "
        "with its results: give --output a .json, .csv or table file name, or remove that file first\n"
    )
    assert r.stdout == ""
    assert (tmp_path / name).read_bytes() == before


def test_bench_still_replaces_earlier_results(tmp_path):
    (tmp_path / "old.json").write_text("{}")
    r = _sh([*BENCH, "-q", "--output", "old.json"], "", tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"schema": "gpubptt.bench/1"' in (tmp_path / "old.json").read_text()
    for _ in range(2):  # a table under a .npz name is bench's own: the same command runs again
        r = _sh([*BENCH, "-q", "--output", "table.npz"], "", tmp_path)
        assert r.returncode == 0, r.stderr


def test_settled_streams_keep_a_handler_of_their_own(monkeypatch):
    import io

    from gpubptt.cli import _common

    strict = io.TextIOWrapper(io.BytesIO(), encoding="latin-1", errors="strict")
    escaping = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="surrogateescape")  # as under LC_ALL=C
    monkeypatch.setattr(sys, "stdout", strict)
    monkeypatch.setattr(sys, "stderr", escaping)
    _common.settle_streams()
    assert strict.errors == "backslashreplace" and escaping.errors == "surrogateescape"


class _FreeSpace:
    """What ``os.statvfs`` answers for a disk with ``free`` bytes left to every user (and ``reserve`` more to root)."""

    def __init__(self, free: int, reserve: int = 0) -> None:
        self.f_bavail, self.f_bfree, self.f_frsize = free, free + reserve, 1


def _invoke(args: list[str]):
    from typer.testing import CliRunner

    from gpubptt.cli import app

    return CliRunner().invoke(app, args)


def test_train_refuses_a_disk_without_room_for_its_checkpoint_pair(tmp_path, monkeypatch):
    # the files of a real run of the same settings: the last model, the best, and a temporary of each per save
    ref = _invoke([*TRAIN, "--checkpoint", str(tmp_path / "ref.npz")])
    assert ref.exit_code == 0, ref.output
    needed = 2 * ((tmp_path / "ref.npz").stat().st_size + (tmp_path / "ref.best.npz").stat().st_size)
    ck = tmp_path / "ck.npz"
    monkeypatch.setattr(os, "statvfs", lambda folder: _FreeSpace(needed - 1))
    r = _invoke([*TRAIN, "--checkpoint", str(ck)])
    assert r.exit_code == 2
    assert r.output.startswith(f"error: --checkpoint {str(ck)!r}: {os.path.realpath(tmp_path)!r} has ")
    assert "the checkpoint and its best file need about" in r.output and "free some space" in r.output
    assert not ck.exists() and not (tmp_path / "ck.best.npz").exists()
    monkeypatch.setattr(os, "statvfs", lambda folder: _FreeSpace(int(needed * 1.3)))  # the estimate is close
    r = _invoke([*TRAIN, "--checkpoint", str(ck)])
    assert r.exit_code == 0, r.output


def _failing_save(monkeypatch, after: int) -> None:
    """Make every checkpoint save after the first ``after`` fail as on a full disk."""
    import errno

    from gpubptt.cli import _train_report

    real, calls = _train_report.save_run, []

    def save_run(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(_train_report, "save_run", save_run)


def test_a_failed_save_at_an_evaluation_says_which_step_the_checkpoint_keeps(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    _failing_save(monkeypatch, after=1)  # the save at step 2 is written, the one at step 4 fails
    r = _invoke([*TRAIN, "--steps", "4", "--eval-every", "2", "--checkpoint", str(ck)])
    assert r.exit_code == 1
    assert "No space left on device" in r.output
    assert f"{str(ck)!r} keeps step 2" in r.output


def test_a_failed_final_save_of_a_resumed_run_says_which_step_the_checkpoint_keeps(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    assert _invoke([*TRAIN, "--checkpoint", str(ck)]).exit_code == 0
    _failing_save(monkeypatch, after=0)
    r = _invoke(["train", "--resume", "--steps", "4", "--checkpoint", str(ck)])
    assert r.exit_code == 1
    assert "No space left on device" in r.output
    assert f"{str(ck)!r} keeps step 2" in r.output


def test_a_failed_plot_says_that_the_checkpoint_was_saved(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import errno

    from gpubptt import plots

    def plot_history(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plots, "plot_history", plot_history)
    ck, png = tmp_path / "ck.npz", tmp_path / "loss.png"
    r = _invoke([*TRAIN, "--checkpoint", str(ck), "--plot", str(png)])
    assert r.exit_code == 1
    assert f"could not write plot {str(png)!r}: No space left on device; {str(ck)!r} keeps step 2" in r.output


@pytest.mark.parametrize("root", [True, False])
def test_the_space_check_counts_the_reserve_that_root_may_fill(tmp_path, monkeypatch, root):
    monkeypatch.setattr(os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(os, "statvfs", lambda folder: _FreeSpace(1000, reserve=1 << 30))
    r = _invoke([*TRAIN, "--checkpoint", str(tmp_path / "ck.npz")])
    assert (r.exit_code, (tmp_path / "ck.npz").exists()) == ((0, True) if root else (2, False)), r.output


def test_a_resume_with_nothing_left_to_train_needs_no_room(tmp_path, monkeypatch):
    ck = tmp_path / "ck.npz"
    assert _invoke([*TRAIN, "--checkpoint", str(ck)]).exit_code == 0
    before = ck.read_bytes()
    monkeypatch.setattr(os, "statvfs", lambda folder: _FreeSpace(10))
    r = _invoke(["train", "--resume", "--checkpoint", str(ck)])
    assert r.exit_code == 0 and "nothing to do" in r.output
    assert ck.read_bytes() == before


def test_the_checkpoint_estimate_covers_long_text_paths_and_a_resumed_runs_history(tmp_path):
    """The description holds the text files' paths (4 bytes a character, 24 for an escaped é) and a resumed run
    keeps every earlier evaluation: the estimate fell to 0.38 and 0.72 of the file, so a run could start that
    could not save."""
    from gpubptt.training.run import resume_run

    folder = tmp_path / ("é" * 60)
    folder.mkdir()
    (folder / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 30)
    (folder / "v.txt").write_text("a lazy dog. " * 20)
    text = ["train", "--task", "text", "--data", str(folder / "t.txt"), "--val-data", str(folder / "v.txt")]
    text += ["--optimizer", "sgd"]
    for args in ([*text, "--steps", "3", "--hidden", "4", "--batch", "2"],
                 [*TRAIN, "--steps", "60", "--eval-every", "1", "--optimizer", "sgd"],
                 [*TRAIN, "--steps", "400", "--eval-every", "0"]):  # fmt: skip  # no evaluation: none counted
        ck = tmp_path / "ck.npz"
        for f in tmp_path.glob("ck*.npz"):
            f.unlink()
        assert _invoke([*args, "--checkpoint", str(ck)]).exit_code == 0
        more = resume_run(str(ck), backend="numpy", steps=70, eval_every=100)  # its history, and ten steps more
        estimate = _estimate(more)
        assert (
            _invoke(["train", "--resume", "--steps", "70", "--eval-every", "100", "--checkpoint", str(ck)]).exit_code
            == 0
        )
        assert ck.stat().st_size <= estimate <= 1.3 * ck.stat().st_size


def test_the_checkpoint_estimate_counts_no_evaluation_for_a_run_without_any(tmp_path):
    from gpubptt.training.run import new_run

    args = ["--task", "recall", "--delay", "1", "--hidden", "2", "--batch", "1", "--optimizer", "sgd"]
    settings = {"task": "recall", "delay": 1, "hidden": 2, "batch": 1, "optimizer": "sgd"}
    estimate = _estimate(new_run(settings, backend="numpy", steps=1500, eval_every=0))
    ck = tmp_path / "ck.npz"
    r = _invoke(["train", *args, "--steps", "1500", "--eval-every", "0", "--checkpoint", str(ck)])
    assert r.exit_code == 0, r.output
    assert ck.stat().st_size <= estimate <= 1.3 * ck.stat().st_size  # was 1.7: an evaluation counted per step


def _estimate(run) -> int:
    """``checkpoint_bytes`` of a run, with its arguments as ``save_run`` passes them to ``save_checkpoint``."""
    from gpubptt.training.record import checkpoint_bytes

    return checkpoint_bytes(
        run.model, optimizer=run.optimizer, vocab=getattr(run.data, "vocab", None), data=run.data.spec(),
        config=run.config, state=run.state, history=run.history,
    )  # fmt: skip
