"""The MPI communicator, on mpi4py: NumPy buffers directly, CuPy buffers CUDA-aware or through pinned memory.

mpi4py is imported when a communicator is made, never at ``import gpubptt`` (it is optional: ``pip install mpi4py
mpich``, or the source folder's ``mpi`` extra); the CuPy backend only when a CuPy buffer arrives.

A CuPy buffer goes to MPI directly when the MPI is CUDA-aware: ``GPUBPTT_CUDA_AWARE_MPI=1`` says
so (``=0`` says not), else ``MPI.Query_cuda_support()`` where the MPI library has it (MPICH ≥ 4.1,
Open MPI ≥ 5 through mpi4py ≥ 4). Otherwise it is staged: device → pinned host buffer → MPI →
device. Either way the current stream is synchronised first (MPI cannot wait on a CUDA stream):
one host–device sync per collective, which NCCL avoids. The staging and the sync are the buffer's
backend's (``empty_pinned``, ``copy_to_host``, ``copy_from_host``, ``synchronize``): CuPy stays in
``gpubptt.backend``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from ..backend import backend_of
from ..errors import InputError
from .base import Communicator, check_buffer

__all__ = ["MPICommunicator", "cuda_aware_mpi", "import_mpi"]

CUDA_AWARE_ENV = "GPUBPTT_CUDA_AWARE_MPI"


def import_mpi() -> Any:
    """``mpi4py.MPI``, or InputError saying how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise InputError(
            f"--distributed mpi needs mpi4py, which is not importable ({exc}); install it with "
            "`pip install mpi4py mpich` (the MPICH wheel brings mpiexec; in gpubptt's source folder, `pip install -e "
            "'.[mpi]'`) or against your cluster's MPI "
            "(`pip install mpi4py` with its mpicc on PATH)"
        ) from exc
    return MPI


def cuda_aware_mpi(MPI: Any) -> bool:
    """Whether CuPy buffers may go to this MPI directly: the environment variable, else the library's answer."""
    env = os.environ.get(CUDA_AWARE_ENV, "").strip().lower()
    if env in ("1", "true", "yes"):
        return True
    if env in ("0", "false", "no"):
        return False
    if env:
        raise InputError(f"{CUDA_AWARE_ENV} must be 1 or 0 (or unset: ask the MPI library), got {env!r}")
    query = getattr(MPI, "Query_cuda_support", None)
    if query is None:
        return False
    try:
        return bool(query())
    except Exception:  # an MPI without the MPIX extension: not CUDA-aware as far as we can tell
        return False


class MPICommunicator(Communicator):
    """MPI.COMM_WORLD (or ``comm``) as a Communicator; local_rank from the node's shared-memory group.

    ``cuda_aware``: whether CuPy buffers go to MPI directly; None asks ``cuda_aware_mpi`` (which may
    refuse a malformed environment variable).
    """

    kind = "mpi"

    def __init__(self, comm: Any = None, *, cuda_aware: bool | None = None) -> None:
        MPI = import_mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.cuda_aware = cuda_aware_mpi(MPI) if cuda_aware is None else bool(cuda_aware)
        self._pinned: dict[tuple[int, str], np.ndarray] = {}

    def _host_view(self, buf: Any) -> tuple[Any, Any]:
        """(what MPI reads/writes, (the device buffer's backend, the buffer) to copy back into, or None)."""
        if isinstance(buf, np.ndarray):
            return buf, None
        be = backend_of(buf)  # a device buffer: its backend is there
        be.synchronize()  # MPI cannot wait on the stream: host-device sync
        if self.cuda_aware:
            return buf, None
        key = (int(buf.size), buf.dtype.name)
        host = self._pinned.get(key)
        if host is None:
            host = self._pinned[key] = be.empty_pinned(buf.shape, buf.dtype)
        be.copy_to_host(buf, host)
        return host, (be, buf)

    def allreduce(self, buf: Any) -> None:
        check_buffer(buf)
        view, back = self._host_view(buf)
        self.comm.Allreduce(self.MPI.IN_PLACE, view, op=self.MPI.SUM)
        if back is not None:
            back[0].copy_from_host(view, back[1])

    def broadcast(self, buf: Any, root: int = 0) -> None:
        check_buffer(buf)
        if not 0 <= root < self.size:
            raise InputError(f"root must be a rank in [0, {self.size}), got {root}")
        view, back = self._host_view(buf)
        self.comm.Bcast(view, root=root)
        if back is not None:
            back[0].copy_from_host(view, back[1])

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe must not keep the job alive
                pass
        self.comm.Abort(code)
