"""Bad input and failing destinations in `train`, `vanish` and `sample`: a clear error, nothing lost.

Each test names what was wrong and checks the exit code, the message, and that no file was created
or changed. A read-only folder (tests run as root, for whom ``os.access`` always says yes) and a full
disk are simulated by making the calls that create or flush files fail with the errno the OS gives.
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubptt.cli import app

runner = CliRunner()
TEXT = "to be or not to be, that is the question. " * 40
TINY = ["--hidden", "12", "--batch", "4", "--chunk", "8", "--backend", "numpy"]
VANISH = ["vanish", "--backend", "numpy", "--seq-len", "6", "--hidden", "5", "--batch", "2", "--vocab", "4"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder in which creating a file fails with EROFS, as on a read-only mount (even for root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    return folder


def _no_work(result) -> bool:
    """True when the command stopped before training or measuring (no step or table line printed)."""
    return "step " not in result.output and "saturated" not in result.output


# -- destinations, probed before any work ---------------------------------------------------------------
def test_check_writable_probes_the_folder_for_real(read_only, tmp_path):
    from gpubptt import _paths

    with pytest.raises(_paths.DestinationError, match=r"--plot .*cannot create a file.*Read-only file system"):
        _paths.check_writable(read_only / "x.png", "--plot")
    assert list(read_only.iterdir()) == []
    assert _paths.check_writable(tmp_path / "ok.png", "--plot") == tmp_path / "ok.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ro"]  # the probe file is gone again


def test_train_checkpoint_in_a_read_only_folder_is_refused_before_training(read_only, corpus):
    ck = read_only / "ck.npz"
    result = runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--steps", "5", "--checkpoint", str(ck)])
    assert result.exit_code == 2, result.output
    assert "error: --checkpoint" in result.output and "Read-only file system" in result.output
    assert _no_work(result) and not ck.exists()


def test_train_plot_in_a_read_only_folder_is_refused_before_training(read_only, corpus, tmp_path):
    pytest.importorskip("matplotlib")
    ck = tmp_path / "ck.npz"
    args = ["--data", str(corpus), "--steps", "5", "--checkpoint", str(ck), "--plot", str(read_only / "loss.png")]
    result = runner.invoke(app, ["train", *TINY, *args])
    assert result.exit_code == 2 and "error: --plot" in result.output and "Read-only" in result.output
    assert _no_work(result) and not ck.exists()


def test_vanish_plot_in_a_read_only_folder_is_refused_before_measuring(read_only):
    pytest.importorskip("matplotlib")
    result = runner.invoke(app, [*VANISH, "--plot", str(read_only / "v.png")])
    assert result.exit_code == 2 and "error: --plot" in result.output and "Read-only" in result.output
    assert _no_work(result)


@pytest.mark.parametrize("name", ["folder", ""])
def test_train_checkpoint_that_is_a_folder_or_empty_is_refused(tmp_path, corpus, name):
    target = tmp_path / "folder" if name else Path(name)
    (tmp_path / "folder").mkdir()
    args = ["--data", str(corpus), "--steps", "5", "--force", "--checkpoint", str(target) if name else ""]
    result = runner.invoke(app, ["train", *TINY, *args])
    assert result.exit_code == 2, result.output
    assert "--checkpoint" in result.output and ("is a folder" in result.output or "empty path" in result.output)
    assert _no_work(result) and list((tmp_path / "folder").iterdir()) == []


def test_train_checkpoint_under_a_file_is_refused(tmp_path, corpus):
    result = runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--checkpoint", str(corpus / "ck.npz")])
    assert result.exit_code == 2 and "is not a folder" in result.output and corpus.read_text() == TEXT


# -- writes that fail at the end: the message says what and where; the old file stays ----------------
def test_train_full_disk_at_the_final_save_keeps_the_old_checkpoint(tmp_path, corpus, monkeypatch):
    ck = tmp_path / "ck.npz"
    assert (
        runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--steps", "3", "--checkpoint", str(ck)]).exit_code
        == 0
    )
    before = ck.read_bytes()
    calls = []

    def fsync(fd):  # the destination probe still fits; the disk is full by the final save
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    args = ["--data", str(corpus), "--steps", "3", "--eval-every", "0", "--force", "--checkpoint", str(ck)]
    result = runner.invoke(app, ["train", *TINY, *args])
    assert result.exit_code == 1
    best = tmp_path / "ck.best.npz"  # the final evaluation is this run's best: both files, written together
    assert (
        f"error: could not write checkpoint {str(ck)!r} and its best file {str(best)!r}: No space left on device"
        in (result.output)
    )
    assert "Traceback" not in result.output and ck.read_bytes() == before
    # no temporary file left (ck.best.npz: the first run's best model, beside its last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.best.npz", "ck.npz", "corpus.txt"]


@pytest.mark.parametrize("command", ["train", "vanish"])
def test_full_disk_while_writing_the_plot_keeps_the_old_png(tmp_path, corpus, monkeypatch, command):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out.png"
    png.write_bytes(b"old picture")
    real_replace = os.replace

    def replace(src, dst):  # the PNG is written to a temporary file, and then the disk is full
        if str(dst).endswith(".png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    if command == "train":
        args = ["train", *TINY, "--data", str(corpus), "--steps", "3", "--checkpoint", str(tmp_path / "ck.npz")]
    else:
        args = VANISH
    result = runner.invoke(app, [*args, "--plot", str(png)])
    assert result.exit_code == 1
    assert f"error: could not write plot {str(png)!r}: No space left on device" in result.output
    assert png.read_bytes() == b"old picture"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the half-written temporary is gone


# -- inputs that used to end in a traceback or never end -----------------------------------------------
@pytest.mark.parametrize("epochs", ["inf", "nan", "-1"])
def test_train_epochs_must_be_finite_and_positive(tmp_path, corpus, epochs):
    ck = tmp_path / "ck.npz"
    result = runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--epochs", epochs, "--checkpoint", str(ck)])
    assert result.exit_code == 2 and "error: --epochs must be a finite number > 0" in result.output
    assert _no_work(result) and not ck.exists()


def test_sample_negative_seed_is_a_usage_error(tmp_path, corpus):
    ck = tmp_path / "ck.npz"
    assert (
        runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--steps", "2", "--checkpoint", str(ck)]).exit_code
        == 0
    )
    result = runner.invoke(app, ["sample", "--checkpoint", str(ck), "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output
    assert result.stdout == ""


def test_sample_text_refuses_a_negative_seed_by_name(tmp_path):
    from gpubptt import RNN, InputError
    from gpubptt.training.data import Vocab
    from gpubptt.training.sample import sample_text

    vocab = Vocab.from_text("abc")
    with pytest.raises(InputError, match="seed must be an int ≥ 0"):
        sample_text(RNN(3, 4, 3, backend="numpy"), vocab, length=3, seed=-1)


@pytest.fixture
def fifo(tmp_path):
    """A named pipe that a thread feeds TEXT once someone opens it: only a reader that waits gets data."""
    path = tmp_path / "pipe"
    os.mkfifo(path)

    def feed():
        with open(path, "w", encoding="utf-8") as f:  # blocks until a reader opens the pipe
            f.write(TEXT)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    yield path
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # let a writer still waiting finish
    writer.join(timeout=5)
    os.close(fd)


@pytest.mark.parametrize("command", ["train", "vanish"])
def test_data_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, fifo, command):
    if command == "train":
        args = ["train", *TINY, "--steps", "2", "--data", str(fifo), "--checkpoint", str(tmp_path / "ck.npz")]
    else:
        args = ["vanish", "--backend", "numpy", "--checkpoint", str(tmp_path / "ck.npz"), "--data", str(fifo)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--data" in result.output and "not a regular file" in result.output


@pytest.mark.parametrize("command", ["sample", "vanish"])
def test_checkpoint_that_is_a_pipe_is_refused_without_reading(fifo, command):
    result = runner.invoke(app, [command, "--checkpoint", str(fifo)])
    assert result.exit_code == 2 and "--checkpoint" in result.output and "not a regular file" in result.output


def test_train_checkpoint_that_is_a_device_is_refused(tmp_path, corpus):
    result = runner.invoke(app, ["train", *TINY, "--data", str(corpus), "--resume", "--checkpoint", "/dev/null"])
    assert result.exit_code == 2 and "not a regular file" in result.output
