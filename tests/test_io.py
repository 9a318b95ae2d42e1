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
    legacy = tmp_path / ".ck.npz.k3j4h5g6.tmp"  # an older gpubptt's name: no process ID in it
    legacy.write_bytes(b"x" * 100)
    _age(legacy, STALE_SECONDS + 60)

    pid_host = next(iter(orphans))[len(".ck.npz.") : -len(".tmp")].rsplit(".", 1)[0]  # "{pid}@{host}"
    host = pid_host.split("@", 1)[1]
    keep = {
        f".ck.npz.{os.getpid()}@{host}.abcd1234.tmp",  # a writer of this machine that is alive: this process
        ".ck.npz.q1w2e3r4.tmp",  # no process ID, but recent: its writer may still be at work
        ".ck.npz.999999@another-machine.abcd1234.tmp",  # another machine's, recent
        ".ck.npz.bak.k3j4h5g6.tmp",  # a temporary of another target, "ck.npz.bak"
        ".other.npz.k3j4h5g6.tmp",
        "ck.npz.k3j4h5g6.tmp",  # no leading dot: not ours
        "notes.txt",
    }
    for name in keep:
        (tmp_path / name).write_bytes(b"keep")
    for name in (".ck.npz.bak.k3j4h5g6.tmp", ".other.npz.k3j4h5g6.tmp", "ck.npz.k3j4h5g6.tmp", "notes.txt"):
        _age(tmp_path / name, STALE_SECONDS + 60)

    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert set(os.listdir(tmp_path)) == keep | {"ck.npz"}  # the two orphans and the old legacy one are gone
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
