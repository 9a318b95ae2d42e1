"""The NCCL communicator: CuPy buffers summed between GPUs on the current stream, with no host sync.

One GPU per rank: ``select_gpu(local_rank)`` makes device ``local_rank mod n_devices`` current, and
must run before any CuPy array of the run is made. NCCL's unique id is drawn on rank 0 and
broadcast over MPI (``bootstrap``); a single rank needs no MPI at all (the id is drawn locally).
CuPy and mpi4py are imported only when a communicator is made.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .base import Communicator, check_buffer

__all__ = ["NCCLCommunicator", "check_nccl", "select_gpu"]


def _import_nccl() -> tuple[Any, Any]:
    try:
        import cupy
        from cupy.cuda import nccl
    except ImportError as exc:
        raise InputError(
            f"--distributed nccl needs CuPy with NCCL, which is not importable ({exc}); install "
            "`pip install cupy-cuda12x` or `cupy-cuda13x` (CuPy's wheels bring NCCL; in gpubptt's source folder, "
            "`pip install -e '.[cuda12]'` or `'.[cuda13]'`)"
        ) from exc
    if not getattr(nccl, "available", True):
        raise InputError("--distributed nccl: this CuPy was built without NCCL; use --distributed mpi")
    return cupy, nccl


def check_nccl(local_rank: int) -> None:
    """InputError unless this process could make an NCCLCommunicator: CuPy with NCCL, and a GPU (made current)."""
    _import_nccl()
    if select_gpu(local_rank) is None:
        raise InputError("--distributed nccl needs a CUDA device, and CuPy sees none")


def select_gpu(local_rank: int) -> int | None:
    """Make GPU ``local_rank mod n`` current for this process; its index, or None where CuPy or a GPU is missing."""
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, or no driver/device: the run stays on the CPU
        return None
    if n < 1:
        return None
    device = local_rank % n
    cupy.cuda.Device(device).use()
    return device


class NCCLCommunicator(Communicator):
    """NCCL over the ranks of ``mpi`` (an MPICommunicator), or a single rank when ``mpi`` is None.

    allreduce/broadcast take CuPy buffers and run on the current stream (no host sync); NumPy
    buffers (small control messages: checksums, option hashes) are staged through the device.
    barrier and abort go through MPI.
    """

    kind = "nccl"

    def __init__(self, mpi: Any = None) -> None:
        cupy, nccl = _import_nccl()
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.size = (0, 1) if mpi is None else (mpi.rank, mpi.size)
        self.local_rank = 0 if mpi is None else mpi.local_rank
        self.device = select_gpu(self.local_rank)
        if self.device is None:
            raise InputError("--distributed nccl needs a CUDA device, and CuPy sees none")
        uid = nccl.get_unique_id() if self.rank == 0 else None
        if mpi is not None:
            uid = mpi.comm.bcast(uid, root=0)  # the bootstrap: NCCL's id travels over MPI
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _device(self, buf: Any) -> tuple[Any, bool]:
        if isinstance(buf, np.ndarray):
            return self.cupy.asarray(buf), True
        return buf, False

    def allreduce(self, buf: Any) -> None:
        check_buffer(buf)
        dev, staged = self._device(buf)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.allReduce(
            dev.data.ptr, dev.data.ptr, dev.size, self._types[dev.dtype.name], self.nccl.NCCL_SUM, stream
        )
        if staged:
            buf[...] = dev.get()

    def broadcast(self, buf: Any, root: int = 0) -> None:
        check_buffer(buf)
        if not 0 <= root < self.size:
            raise InputError(f"root must be a rank in [0, {self.size}), got {root}")
        dev, staged = self._device(buf)
        stream = self.cupy.cuda.get_current_stream().ptr
        self.comm.bcast(dev.data.ptr, dev.size, self._types[dev.dtype.name], root, stream)
        if staged:
            buf[...] = dev.get()

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        if self.mpi is not None:
            self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        try:
            self.comm.abort()
        finally:
            if self.mpi is not None:
                self.mpi.abort(code)
            import os

            os._exit(code)
