"""Where output files go: check a destination before any work, and write a file whole or not at all.

``check_writable`` is the one probe every command runs on each file it will write (checkpoint, PNG,
results) before it starts: the folder exists, is a folder, and really takes a new file (a temporary
file is created and removed there: ``os.access`` says yes to root even on a read-only mount), and
the target itself is not a folder. ``replacing`` lets a writer that only takes a path (matplotlib's
``savefig``) write a temporary file beside the target, which then replaces it in one rename, so a
full disk leaves the old file as it was. ``write_error`` words an OSError of such a write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

__all__ = ["DestinationError", "check_regular_file", "check_writable", "replacing", "write_error"]


class DestinationError(InputError):
    """An output path that cannot be written: no such folder, a folder as the target, read-only, full."""


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path once it is sure a file can be written there; DestinationError otherwise.

    ``option`` names the setting in the message (``"--checkpoint"``). Checks, in order: the path is
    not empty, the target is not a folder nor any other non-regular file (``/dev/zero``), its folder
    exists and is a folder, and a new file can be created (and is removed again) in that folder.
    Nothing else is created or changed.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise DestinationError(f"{option} must name a file, got an empty path")
    p = Path(text)
    folder = p.parent
    if p.is_dir():
        raise DestinationError(f"{option} {text!r} is a folder; expected a file name (e.g. {str(p / 'out')!r})")
    if p.exists() and not p.is_file():
        raise DestinationError(f"{option} {text!r} exists and is not a regular file (a device, pipe or socket)")
    if not folder.exists():
        raise DestinationError(f"{option} {text!r}: folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DestinationError(f"{option} {text!r}: {str(folder)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".probe")
    except OSError as exc:
        raise DestinationError(f"{option} {text!r}: cannot create a file in {str(folder)!r}: {_reason(exc)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return p


def check_regular_file(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path unless it exists and is not a regular file (a folder, ``/dev/zero``, a pipe).

    Reading such a path would fail late or never end; a missing file is left to the reader, whose
    message says so. DestinationError names ``option`` and what was found.
    """
    text = os.fspath(path)
    p = Path(text)
    if not str(text).strip():
        raise DestinationError(f"{option} must name a file, got an empty path")
    if p.is_dir():
        raise DestinationError(f"{option} {text!r} is a folder; expected a file")
    if p.exists() and not p.is_file():
        raise DestinationError(f"{option} {text!r} is not a regular file (a device, pipe or socket); expected a file")
    return p


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write; it replaces ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left exactly as it was.
    """
    p = Path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.stem}.", suffix=p.suffix)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(p))  # mkstemp makes it 0600; give it the mode a plain open() would
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_for(path: Path) -> int:
    """The existing file's permission bits, else 0666 minus the process umask (what open() would give)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_error(what: str, path: str | os.PathLike[str], exc: OSError) -> str:
    """One line for a failed write: ``could not write checkpoint 'ck.npz': No space left on device``."""
    return f"could not write {what} {os.fspath(path)!r}: {_reason(exc)}"
