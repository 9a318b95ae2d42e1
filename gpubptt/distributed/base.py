"""The communicator interface, the size-1 local communicator and an in-process fake of N ranks.

A communicator is what data-parallel training asks of MPI or NCCL, and no more:

    rank, size, local_rank        who this process is (local_rank: its index on its node)
    allreduce(buf)                buf ← Σ over ranks of buf, IN PLACE, one flat contiguous buffer
    broadcast(buf, root=0)        buf ← root's buf, in place
    barrier()                     every rank reaches this point before any leaves it
    abort(code)                   end every rank of the job now (never returns)

Buffers are 1-d contiguous float32/float64 arrays of the caller's array library (NumPy or CuPy);
the communicator moves them as it can (MPI directly, through pinned host memory, or NCCL).

    >>> import numpy as np
    >>> from gpubptt.distributed import LocalCommunicator
    >>> buf = np.arange(3.0)
    >>> LocalCommunicator().allreduce(buf); buf          # one rank: the sum is the buffer itself
    array([0., 1., 2.])
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["Communicator", "FakeGroup", "LocalCommunicator", "allgather_text", "check_buffer", "run_ranks"]


def check_buffer(buf: Any, what: str = "buffer") -> None:
    """InputError unless buf is a 1-d contiguous float32/float64 array (what every collective moves)."""
    shape, dtype = getattr(buf, "shape", None), getattr(buf, "dtype", None)
    if shape is None or len(shape) != 1 or np.dtype(dtype).name not in ("float32", "float64"):
        raise InputError(
            f"{what} must be a 1-d float32 or float64 array, got "
            f"{type(buf).__name__} shape {shape} dtype {getattr(dtype, 'name', dtype)}"
        )
    if not buf.flags.c_contiguous:
        raise InputError(f"{what} must be contiguous (one flat buffer), got a strided view of shape {shape}")


def allgather_text(comm: Communicator, text: str) -> list[str]:
    """Every rank's ``text``, in rank order, the same list on every rank (collective: two allreduces).

    Sizes first, then each rank's UTF-8 bytes in its own slice of one float64 buffer of zeros (bytes
    are exact in float64, and sums with zeros are exact). For the few messages that decide whether
    a job starts, not for data.
    """
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    sizes = np.zeros(comm.size)
    sizes[comm.rank] = data.size
    comm.allreduce(sizes)
    ends = np.cumsum(sizes).astype(np.int64)
    starts = ends - sizes.astype(np.int64)
    buf = np.zeros(max(int(ends[-1]), 1))  # one element at least: every rank calls the second allreduce
    buf[starts[comm.rank] : ends[comm.rank]] = data
    comm.allreduce(buf)
    return [buf[a:b].astype(np.uint8).tobytes().decode("utf-8", "replace") for a, b in zip(starts, ends, strict=True)]


class Communicator:
    """What data-parallel training needs from MPI/NCCL; see the module docstring. Subclasses fill it in."""

    kind = "abstract"
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    def allreduce(self, buf: Any) -> None:
        """buf ← Σ_ranks buf, in place. buf: (n,) float32/float64, contiguous; the same n on every rank."""
        raise NotImplementedError

    def broadcast(self, buf: Any, root: int = 0) -> None:
        """buf ← root's buf, in place. buf: (n,) float32/float64, contiguous."""
        raise NotImplementedError

    def barrier(self) -> None:
        """Wait until every rank got here."""
        raise NotImplementedError

    def abort(self, code: int = 1) -> None:
        """End the whole job with exit status ``code`` (every rank, now)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class LocalCommunicator(Communicator):
    """One process, no dependency: every collective leaves the buffer as it is."""

    kind = "local"

    def allreduce(self, buf: Any) -> None:
        check_buffer(buf)

    def broadcast(self, buf: Any, root: int = 0) -> None:
        check_buffer(buf)
        if root != 0:
            raise InputError(f"root must be a rank in [0, 1), got {root}")

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)


class FakeGroup:
    """N simulated ranks in one process (threads), for tests: ``group.comm(r)`` is rank r's communicator.

    allreduce sums the N buffers in rank order on every rank (so every rank gets the same bits, as
    MPI and NCCL give); a rank that raises breaks the barrier, and the others raise too instead of
    waiting forever.
    """

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"size must be an int ≥ 1, got {size!r}")
        self.size = int(size)
        self._slots: list[Any] = [None] * self.size
        self._barrier = threading.Barrier(self.size, timeout=60)

    def comm(self, rank: int) -> FakeCommunicator:
        return FakeCommunicator(self, rank)

    def abort(self) -> None:
        self._barrier.abort()


class FakeCommunicator(Communicator):
    """Rank ``rank`` of a ``FakeGroup``."""

    kind = "fake"

    def __init__(self, group: FakeGroup, rank: int) -> None:
        if not 0 <= rank < group.size:
            raise InputError(f"rank must be in [0, {group.size}), got {rank}")
        self.group, self.rank, self.size, self.local_rank = group, rank, group.size, rank

    def _exchange(self, buf: Any) -> list[Any]:
        g = self.group
        g._slots[self.rank] = buf.copy()
        g._barrier.wait()
        got = list(g._slots)
        g._barrier.wait()  # nobody overwrites a slot before everyone has read them all
        sizes = {int(b.shape[0]) for b in got}
        if len(sizes) != 1:
            raise InputError(f"ranks passed buffers of different sizes {sorted(sizes)} to one collective")
        return got

    def allreduce(self, buf: Any) -> None:
        check_buffer(buf)
        got = self._exchange(buf)
        total = got[0].copy()
        for b in got[1:]:
            total += b  # rank order: the same bits on every rank
        buf[...] = total

    def broadcast(self, buf: Any, root: int = 0) -> None:
        check_buffer(buf)
        if not 0 <= root < self.size:
            raise InputError(f"root must be a rank in [0, {self.size}), got {root}")
        buf[...] = self._exchange(buf)[root]

    def barrier(self) -> None:
        self.group._barrier.wait()

    def abort(self, code: int = 1) -> None:
        self.group.abort()
        raise SystemExit(code)


def run_ranks(size: int, fn: Callable[[Communicator], Any]) -> list[Any]:
    """Run ``fn(comm)`` on ``size`` fake ranks (threads); the results in rank order; a rank's exception re-raised.

    A rank that raises breaks the group's barrier, so the others stop too (BrokenBarrierError)
    instead of hanging; the first rank's own exception is the one raised here.
    """
    group = FakeGroup(size)
    results: list[Any] = [None] * size
    errors: list[BaseException | None] = [None] * size

    def target(r: int) -> None:
        try:
            results[r] = fn(group.comm(r))
        except BaseException as exc:  # re-raised in the caller's thread below
            errors[r] = exc
            group.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"fake-rank-{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
