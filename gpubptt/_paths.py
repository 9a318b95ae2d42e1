"""Checks on the files a command will write, made before any work so a long run never ends unable to save.

Writability is tested by trying: a small temporary file is created, written and removed in the target's
folder. ``os.access`` is not enough: it says yes to root on a read-only mount and knows nothing of a full disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import InputError

__all__ = ["check_writable"]

#: Bytes the probe writes: enough that a disk with no free block refuses it, small enough to cost nothing.
PROBE_BYTES = 4096


def check_writable(path: Path, option: str) -> None:
    """Raise InputError, naming ``option`` and ``path``, unless a file can be written at ``path`` now.

    ``path`` must name a regular file (existing or not) in an existing folder where a file can be
    created and written. The probe leaves the folder as it was; an existing file at ``path`` is not touched.
    """
    where = f"{option} {str(path)!r}"
    if path.is_dir():
        raise InputError(f"{where} is a folder; expected a file name")
    if path.exists() and not path.is_file():
        raise InputError(f"{where} exists and is not a regular file; expected a file name to write")
    folder = path.parent
    if not folder.exists():
        raise InputError(f"{where}: folder {str(folder)!r} does not exist; expected a file in an existing folder")
    if not folder.is_dir():
        raise InputError(f"{where}: {str(folder)!r} is not a folder; expected a file in an existing folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
    except OSError as exc:
        raise InputError(f"{where}: cannot create a file in folder {str(folder)!r} ({exc.strerror or exc})") from exc
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)  # some file systems report a full disk only when the data reaches it
    except OSError as exc:
        raise InputError(f"{where}: cannot write in folder {str(folder)!r} ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
