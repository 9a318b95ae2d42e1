"""Atomic writes: temporaries that killed writers left behind are removed by the next save, and
nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from gpubptt._io import STALE_SECONDS, write_atomic

# A writer killed between writing its temporary and renaming it over the target.
KILLED_WRITER = """
import os, sys
from gpubptt import _io
os.replace = lambda *args: os._exit(9)
_io.write_atomic(sys.argv[1], b"half a checkpoint" * 1000)
"""


def _kill_during_save(target: Path) -> set[str]:
    before = set(os.listdir(target.parent))
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env={**os.environ}, check=False)
    assert proc.returncode == 9
    return set(os.listdir(target.parent)) - before


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_save_removes_abandoned_temporaries_of_its_target_and_nothing_else(tmp_path):
    target = tmp_path / "ck.npz"
    target.write_bytes(b"old")
    orphans = _kill_during_save(target) | _kill_during_save(target)
    assert len(orphans) == 2 and all(n.startswith(".ck.npz.") and n.endswith(".tmp") for n in orphans)
    assert target.read_bytes() == b"old"  # the kills left the target whole

    pid_host = next(iter(orphans))[len(".ck.npz.") : -len(".tmp")].rsplit(".", 1)[0]  # "{pid}@{host}"
    host = pid_host.split("@", 1)[1]
    keep = {
        f".ck.npz.{os.getpid()}@{host}.abcd1234.tmp",  # a writer of this machine that is alive: this process
        ".ck.npz.q1w2e3r4.tmp",  # no process ID: a user's file, recent
        ".ck.npz.original.tmp",  # no process ID, old: still a user's file (never a writer's of ours)
        ".ck.npz.999999@another-machine.abcd1234.tmp",  # another machine's, recent
        ".ck.npz.bak.k3j4h5g6.tmp",  # a temporary of another target, "ck.npz.bak"
        ".other.npz.k3j4h5g6.tmp",
        "ck.npz.k3j4h5g6.tmp",  # no leading dot: not ours
        "notes.txt",
    }
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    for name in (
        ".ck.npz.original.tmp",
        ".ck.npz.bak.k3j4h5g6.tmp",
        ".other.npz.k3j4h5g6.tmp",
        "ck.npz.k3j4h5g6.tmp",
        "notes.txt",
    ):
        _age(tmp_path / name, STALE_SECONDS + 60)

    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert set(os.listdir(tmp_path)) == keep | {"ck.npz"}  # the two orphans are gone
    assert all((tmp_path / name).read_bytes() == b"keep" for name in keep)


def test_a_symbolic_link_is_written_through_and_stays_a_link(tmp_path):
    from gpubptt._paths import check_writable

    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "ck.npz"
    target.write_bytes(b"old")
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    check_writable(link, "--checkpoint")  # probed where the file really is
    write_atomic(link, b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["ck.npz"]


def test_copies_are_written_together_or_not_at_all(tmp_path):
    (tmp_path / "ro").mkdir()
    target, copy = tmp_path / "ck.npz", tmp_path / "ro" / "ck.best.npz"
    target.write_bytes(b"old")
    copy.write_bytes(b"old best")
    write_atomic(target, b"new", copies=(copy,))
    assert target.read_bytes() == b"new" and copy.read_bytes() == b"new"
    os.chmod(tmp_path / "ro", 0o500)  # the copy's folder refuses new files: its temporary cannot be made
    try:
        if os.access(tmp_path / "ro", os.W_OK):  # root ignores the mode: make the copy's folder vanish instead
            os.chmod(tmp_path / "ro", 0o700)
            copy.unlink()
            (tmp_path / "ro").rmdir()
        try:
            write_atomic(target, b"newer", copies=(copy,))
        except OSError:
            pass
        else:
            raise AssertionError("the copy's write should have failed")
    finally:
        if (tmp_path / "ro").exists():
            os.chmod(tmp_path / "ro", 0o700)
    assert target.read_bytes() == b"new"  # the target was not replaced: the copy's temporary failed first
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_ctrl_c_between_the_renames_waits_until_both_files_are_replaced(tmp_path, monkeypatch):
    import signal

    import pytest

    from gpubptt import _io

    target, copy = tmp_path / "ck.npz", tmp_path / "ck.best.npz"
    target.write_bytes(b"old")
    copy.write_bytes(b"old best")
    real = os.replace

    def replace(src, dst):  # Ctrl-C right after the first file is in place
        real(src, dst)
        if str(dst) == str(target):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(_io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):  # delivered, to Python's own handler, once both are in place
        write_atomic(target, b"new", copies=(copy,))
    assert target.read_bytes() == b"new" and copy.read_bytes() == b"new"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_two_ctrl_c_held_during_a_save_reach_the_handler_twice():
    import signal

    from gpubptt._io import sigint_deferred

    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            assert calls == []  # held
        assert len(calls) == 2  # a second press ("again to stop at once") is not lost
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_failed_stage_closes_its_file_descriptor(tmp_path, monkeypatch):
    import pytest

    target = tmp_path / "ck.npz"
    target.write_bytes(b"old")

    def broken_chmod(*args, **kwargs):
        raise OSError("chmod refused")

    monkeypatch.setattr(os, "chmod", broken_chmod)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(OSError, match="chmod refused"):
            write_atomic(target, b"new")
    assert len(os.listdir("/proc/self/fd")) == before  # was: one descriptor more per failed save
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ck.npz"]


def test_a_folder_target_is_an_os_error_that_the_command_lines_writers_report(tmp_path):
    import pytest

    from gpubptt.cli._common import Failed, write_png

    folder = tmp_path / "loss.png"
    folder.mkdir()  # the target became a folder after the command checked its options
    with pytest.raises(IsADirectoryError, match="is a folder; expected a file name"):
        write_atomic(folder, b"x")
    with pytest.raises(Failed, match=r"loss\.png"):  # one clean line, as for any other OSError
        write_png(folder, "plot", lambda path: write_atomic(path, b"png"))
