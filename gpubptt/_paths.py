"""Where output files go: check a destination before any work, and write a file whole or not at all.

``check_writable`` is the one probe every command runs on each file it will write (checkpoint, PNG,
results) before it starts: the folder exists, is a folder, and really takes a new file (a small
temporary file is created, written, fsync'ed and removed there: ``os.access`` says yes to root even
on a read-only mount and knows nothing of a full disk), and the target itself is not a folder.
``check_regular_file`` refuses a folder, a device or a pipe given as an input file. Both first run
``check_path``: no name longer than the file system takes, no symbolic link that loops. ``check_space``
compares the free space of a destination's file system with what a command will write there (``train``:
its checkpoint and best file, from the sizes of the model and optimizer state). ``check_distinct``
refuses two outputs of one command (or an output and an input, or stdout) that are one file after links
and ``..``. ``write_error`` words an OSError of a write (files themselves are written whole or not at
all by ``_io.write_atomic``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputError

__all__ = [
    "DestinationError",
    "check_distinct",
    "check_path",
    "check_regular_file",
    "check_space",
    "check_writable",
    "write_error",
]


#: Bytes the probe writes: enough that a disk with no free block refuses it, small enough to cost nothing.
PROBE_BYTES = 4096
#: The longest name of one path component, in bytes, on the common file systems (ext4, XFS, APFS, NTFS).
NAME_MAX = 255


class DestinationError(InputError):
    """An output path that cannot be written: no such folder, a folder as the target, read-only, full."""


def check_path(path: str | os.PathLike[str], option: str) -> str:
    """``path`` as text once it names something the OS can look up; DestinationError otherwise.

    Refused: an empty path, a component longer than ``NAME_MAX`` bytes (the OS answers ENAMETOOLONG),
    a symbolic link that loops (to itself or through others), and any other error of ``stat`` but
    "no such file" and "not a folder" (left to the caller, whose message says which folder is missing).
    """
    text = os.fspath(path)
    if not str(text).strip():
        raise DestinationError(f"{option} must name a file, got an empty path")
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise DestinationError(
                f"{option}: the name {part[:40]!r}… is {len(os.fsencode(part))} bytes long; "
                f"a file or folder name may have at most {NAME_MAX} bytes"
            )
    try:
        os.stat(text)
    except (FileNotFoundError, NotADirectoryError):
        pass  # missing, or a dangling link: the folder checks below say what is missing
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DestinationError(
                f"{option} {text!r} is a symbolic link that loops ({_reason(exc)}); expected a file or a link to one"
            ) from None
        raise DestinationError(f"{option} {text!r}: {_reason(exc)}") from None
    return text


def _identity(path: str | os.PathLike[str]) -> tuple:
    """What makes two paths one file: the device and inode where it exists, else the resolved path."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def _stdout_identity() -> tuple | None:
    """The identity of the file stdout writes to, when it is a regular file (``> out.txt``); else None."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real file behind it (a test's capture, a closed stream)
        return None
    return ("inode", st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def check_distinct(
    outputs: Mapping[str, str | os.PathLike[str] | None],
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """DestinationError when two of a command's ``outputs`` are one file, or an output is one of its ``inputs``.

    Keys are the options (``"--checkpoint"``), None values are skipped. Paths are compared after
    symbolic links and ``..`` are resolved, and by device and inode where the file exists (a hard
    link). Stdout redirected to a regular file counts as an output: it must not be an input or another
    output either (``sample --checkpoint ck.npz >> ck.npz``). Run this before any work.
    """
    inputs = inputs or {}
    seen: dict[tuple, tuple[str, str]] = {}  # identity → (option, path as given)
    for option, path in inputs.items():
        if path is not None:
            seen.setdefault(_identity(path), (option, os.fspath(path)))
    named = [(option, _identity(path), os.fspath(path)) for option, path in outputs.items() if path is not None]
    if (out := _stdout_identity()) is not None:
        named.append(("stdout", out, ""))
    for option, key, text in named:
        if key in seen:
            other, other_text = seen[key]
            text = text or other_text
            if other in inputs and option != "stdout":
                raise DestinationError(
                    f"{other} and {option} name the same file {text!r}: writing {option} would destroy what "
                    f"{other} reads; give {option} another file"
                )
            raise DestinationError(f"{other} and {option} name the same file {text!r}; give each its own")
        seen[key] = (option, text)


def check_writable(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path once it is sure a file can be written there; DestinationError otherwise.

    ``option`` names the setting in the message (``"--checkpoint"``). Checks, in order: the path is
    not empty, the target is not a folder nor any other non-regular file (``/dev/zero``), its folder
    exists and is a folder, and a new file can be created (and is removed again) in that folder.
    Nothing else is created or changed; an existing file at ``path`` is not touched.
    """
    text = check_path(path, option)
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


def check_space(targets: Sequence[str | os.PathLike[str]], size: int, option: str, what: str) -> None:
    """DestinationError when a file system of ``targets`` lacks the room to keep a file of about ``size`` bytes at
    each target, saved again and again; ``what`` names the files in the message ("the checkpoint and its best file").

    A save writes a whole temporary before the old file is replaced (``_io.write_atomic``): each target needs room
    for itself and for the temporary of its next save, 2·size, less what a file already there holds (up to size,
    freed at each replace). Targets on one file system add up. Where the free space cannot be read (no
    ``os.statvfs``), nothing is refused: the probe (``check_writable``) and the writes decide.
    """
    from .engine.memory import format_bytes

    need: dict[int, list] = {}  # device → [bytes needed, bytes available, folder]
    for target in targets:
        real = os.path.realpath(target)  # a link is written through: the space is where its file is
        folder = os.path.dirname(real)
        try:
            vfs, device = os.statvfs(folder), os.stat(folder).st_dev
        except (AttributeError, OSError):
            continue
        try:
            old = os.stat(real).st_size
        except OSError:
            old = 0
        free = vfs.f_bfree if _superuser() and hasattr(vfs, "f_bfree") else vfs.f_bavail  # root: the reserve too
        entry = need.setdefault(device, [0, free * vfs.f_frsize, folder])
        entry[0] += 2 * size - min(old, size)
    for needed, available, folder in need.values():
        if needed > available:
            raise DestinationError(
                f"{option}: {folder!r} has {format_bytes(available)} free, but {what} need about "
                f"{format_bytes(needed)} there (about {format_bytes(size)} each, and as much again for the "
                "temporary copy each save writes before replacing the file); free some space or choose a "
                "folder on another disk"
            )


def _superuser() -> bool:
    """Whether this process writes as root (which may fill the blocks a file system reserves for it)."""
    return hasattr(os, "geteuid") and os.geteuid() == 0


def check_regular_file(path: str | os.PathLike[str], option: str) -> Path:
    """``path`` as a Path unless it exists and is not a regular file (a folder, ``/dev/zero``, a pipe).

    Reading such a path would fail late or never end; a missing file is left to the reader, whose
    message says so. DestinationError names ``option`` and what was found.
    """
    text = check_path(path, option)
    p = Path(text)
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
