"""Where output files go: check a destination before any work, and write a file whole or not at all.

``check_writable`` is the one probe every command runs on each file it will write (checkpoint, PNG,
results) before it starts: the folder exists, is a folder, and really takes a new file (a small
temporary file is created, written, fsync'ed and removed there: ``os.access`` says yes to root even
on a read-only mount and knows nothing of a full disk), and the target itself is not a folder.
``check_regular_file`` refuses a folder, a device or a pipe given as an input file. ``write_error``
words an OSError of a write (files themselves are written whole or not at all by ``_io.write_atomic``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import InputError

__all__ = ["DestinationError", "check_regular_file", "check_writable", "write_error"]


#: Bytes the probe writes: enough that a disk with no free block refuses it, small enough to cost nothing.
PROBE_BYTES = 4096


class DestinationError(InputError):
    """An output path that cannot be written: no such folder, a folder as the target, read-only, full."""


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path once it is sure a file can be written there; DestinationError otherwise.

    ``option`` names the setting in the message (``"--checkpoint"``). Checks, in order: the path is
    not empty, the target is not a folder nor any other non-regular file (``/dev/zero``), its folder
    exists and is a folder, and a new file can be created (and is removed again) in that folder.
    Nothing else is created or changed; an existing file at ``path`` is not touched.
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise DestinationError(f"{option} must name a file, got an empty path")
    p = Path(os.path.realpath(text))  # a link is written through (_io.write_atomic): check what it points to
    folder = p.parent
    if p.is_dir():
        raise DestinationError(f"{option} {text!r} is a folder; expected a file name (e.g. {str(p / 'out')!r})")
    if p.exists() and not p.is_file():
        raise DestinationError(
            f"{option} {text!r} exists and is not a regular file (a device, pipe or socket); expected a file name"
        )
    if not folder.exists():
        raise DestinationError(
            f"{option} {text!r}: folder {str(folder)!r} does not exist; expected a file in an existing folder"
        )
    if not folder.is_dir():
        raise DestinationError(
            f"{option} {text!r}: {str(folder)!r} is not a folder; expected a file in an existing folder"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".probe")
    except OSError as exc:
        raise DestinationError(f"{option} {text!r}: cannot create a file in {str(folder)!r}: {_reason(exc)}") from None
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)  # some file systems report a full disk only when the data reaches them
    except OSError as exc:
        raise DestinationError(f"{option} {text!r}: cannot write in {str(folder)!r}: {_reason(exc)}") from None
    finally:
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


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_error(what: str, path: str | os.PathLike[str], exc: OSError) -> str:
    """One line for a failed write: ``could not write checkpoint 'ck.npz': No space left on device``."""
    return f"could not write {what} {os.fspath(path)!r}: {_reason(exc)}"
