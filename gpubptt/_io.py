"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

An existing file is either replaced whole or left untouched; a failed write leaves no temporary file.
A process killed mid-write does leave one; the next write of the same target removes it (see
``write_atomic`` for when a temporary counts as abandoned).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InputTypeError

__all__ = ["STALE_SECONDS", "check_targets", "file_mode", "sigint_deferred", "write_atomic"]

STALE_SECONDS = 600.0  # a temporary whose writer cannot be checked counts as abandoned after this long


def file_mode(path: Path) -> int:
    """The existing file's permission bits, else 0666 minus the process umask."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _host() -> str:
    """This machine and PID namespace (containers sharing a folder and a hostname differ here), ≤ 40 characters."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:24] or "host"
    with contextlib.suppress(OSError):
        host += f"-ns{os.stat('/proc/self/ns/pid').st_ino}"
    return host


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _abandoned(tmp: Path, middle: str, now: float) -> bool:
    """Whether a temporary ``.{name}.{middle}.tmp`` of our target was left by a writer that is gone."""
    m = re.fullmatch(r"(\d+)@([A-Za-z0-9-]+)\.[A-Za-z0-9_]+", middle)  # ours: {pid}@{host}.{random}
    if m is None:
        return False  # not one of ours (a temporary of another target, "ck.npz.bak", or a user's file)
    if m.group(2) == _host() and os.name == "posix":  # os.kill(pid, 0) would kill on Windows
        return not _pid_alive(int(m.group(1)))
    try:  # another machine's (a shared folder): only its age tells
        return now - tmp.stat().st_mtime > STALE_SECONDS
    except OSError:
        return False


def _remove_abandoned(path: Path) -> None:
    """Delete the abandoned temporaries of ``path``; never raises (a cleanup failure must not fail a save)."""
    prefix, now = f".{path.name}.", time.time()
    with contextlib.suppress(OSError):
        for tmp in path.parent.iterdir():
            name = tmp.name
            if name.startswith(prefix) and name.endswith(".tmp") and len(name) > len(prefix) + 4:
                if _abandoned(tmp, name[len(prefix) : -4], now):
                    with contextlib.suppress(OSError):
                        tmp.unlink()


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back inside the block and delivered right after it (up to two presses, each once)
    to the handler that was in place: what the block does (replace two files, then note that it did) happens
    whole. Only in the main thread, and only where that handler was set from Python; elsewhere the block runs
    as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # set outside Python: it could not be put back
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for _ in held[:2]:  # now, to the handler they were meant for: a second press ("again to stop at once") too
            signal.raise_signal(signal.SIGINT)


def _stage(path: Path, data: str | bytes) -> str:
    """A complete, fsynced temporary ``.{name}.{pid}@{host}.{random}.tmp`` beside ``path`` holding ``data``; its
    name. The abandoned temporaries of ``path`` are removed first; on failure nothing is left behind."""
    _remove_abandoned(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{_host()}.", suffix=".tmp")
    owned = True  # the descriptor is ours to close until the file object takes it over
    try:
        os.chmod(tmp, file_mode(path))  # mkstemp makes it 0600; give it the mode a plain open() would
        f = os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""}))
        owned = False
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if owned:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def check_targets(path: str | os.PathLike[str], copies: Any = ()) -> tuple[str | os.PathLike[str], ...]:
    """``copies`` as a tuple once ``path`` and every copy name a file that can be replaced; else a gpubptt error
    before anything is written. ``copies`` must be a list or tuple of paths (InputTypeError for one path given
    as a str, bytes or os.PathLike: iterated, it would name one file per character); a target that is an existing
    folder is an IsADirectoryError, the OSError the write would raise, but raised before anything is staged
    (``os.replace`` would fail on it only after the targets before it were replaced)."""
    if isinstance(copies, (str, bytes, os.PathLike)):
        raise InputTypeError(
            f"copies must be a list of file paths, got the single {type(copies).__name__} {copies!r} (read as one "
            f"file per character); pass a list: copies=[{copies!r}]"
        )
    try:
        copies = tuple(copies)
    except TypeError:
        raise InputTypeError(f"copies must be a list of file paths, got {type(copies).__name__} {copies!r}") from None
    named = [("path", path), *((f"copies[{i}]", c) for i, c in enumerate(copies))]
    for what, p in named:
        if not isinstance(p, (str, os.PathLike)) or isinstance(os.fspath(p), bytes):
            raise InputTypeError(f"{what} must be a file path (str or os.PathLike), got {type(p).__name__} {p!r}")
        target = Path(os.path.realpath(p))  # a link is written through: check what it points to
        if target.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"{what} is a folder; expected a file name", os.fspath(p))
    return copies


def write_atomic(
    path: str | os.PathLike[str], data: str | bytes, *, copies: tuple[str | os.PathLike[str], ...] = ()
) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, durably where the OS allows; and the same
    data to each of ``copies`` (a checkpoint and its best file) with them: every temporary is written in full
    before any target is replaced, so a failed write (a full disk, a folder that refuses it) leaves every
    target as it was. Only a rename failing after that (which needs the folder's permissions to change in
    between) can leave some replaced and some not.

    The temporary is ``.{name}.{pid}@{host}.{random}.tmp`` beside the target. Before writing, the
    temporaries of the same target left by killed writers are deleted: those of this machine whose
    process ID no longer runs, and those of another machine when unmodified for ``STALE_SECONDS``. The
    temporary of a writer still at work is never touched; files of other targets and other names are left
    alone. A symbolic link is written through: the file it points to is replaced, and the link stays a link.
    Every target is checked first (``check_targets``): nothing is staged when one is a folder, or ``copies`` is
    not a list of paths.
    """
    copies = check_targets(path, copies)
    targets = [Path(os.path.realpath(p)) for p in (path, *copies)]
    staged: list[str] = []
    try:
        for target in targets:
            staged.append(_stage(target, data))
        with sigint_deferred():  # a Ctrl-C between two renames would leave the pair half replaced
            for i, (tmp, target) in enumerate(zip(staged, targets, strict=True)):
                os.replace(tmp, target)
                staged[i] = ""
    except BaseException:
        for tmp in staged:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        raise
    for folder in {t.parent for t in targets}:
        with contextlib.suppress(OSError):  # make the rename itself durable (not possible everywhere)
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
