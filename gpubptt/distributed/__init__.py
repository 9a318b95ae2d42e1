"""Many processes training one model: communicators (local, MPI, NCCL, an in-process fake) and data parallelism.

    mpiexec -n 4 gpubptt train --distributed mpi        # 4 processes, each a quarter of the batch

``make_communicator(kind)`` gives the communicator of this process ("none": one process, no
dependency; "mpi": mpi4py; "nccl": NCCL between GPUs, bootstrapped over MPI); ``DataParallel``
wraps a model so that the training loop trains one model on all ranks' streams. mpi4py and CuPy
are imported only by the communicators that need them.

    >>> from gpubptt.distributed import run_ranks
    >>> import numpy as np
    >>> def work(comm):
    ...     buf = np.full(2, comm.rank + 1.0)
    ...     comm.allreduce(buf)
    ...     return buf.tolist()
    >>> run_ranks(3, work)                          # three fake ranks: 1 + 2 + 3 everywhere
    [[6.0, 6.0], [6.0, 6.0], [6.0, 6.0]]
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from ..errors import InputError
from .base import Communicator, FakeGroup, LocalCommunicator, allgather_text, check_buffer, run_ranks
from .parallel import DataParallel, ParameterDivergenceError, ShardedData, shard_range

__all__ = [
    "KINDS",
    "Communicator",
    "DataParallel",
    "FakeGroup",
    "LocalCommunicator",
    "ParameterDivergenceError",
    "ShardedData",
    "allgather_text",
    "check_buffer",
    "install_abort_hook",
    "make_communicator",
    "run_ranks",
    "shard_range",
]

KINDS = ("none", "mpi", "nccl")


def make_communicator(kind: str = "none") -> Communicator:
    """This process's communicator: "none" (LocalCommunicator), "mpi" (MPICommunicator) or "nccl".

    "nccl" makes GPU ``local_rank mod n`` current, so call it before any CuPy array is made.
    InputError naming what is missing (mpi4py, CuPy, a GPU).
    """
    if kind == "none":
        return LocalCommunicator()
    if kind == "mpi":
        from .mpi import MPICommunicator

        return MPICommunicator()
    if kind == "nccl":
        from .mpi import MPICommunicator
        from .nccl import NCCLCommunicator

        return NCCLCommunicator(MPICommunicator())
    raise InputError(f"unknown distributed kind {kind!r}; expected one of {', '.join(KINDS)}")


#: Seconds between a failing rank's message and its abort: without them the launcher (MPICH's Hydra) may end
#: the job before it has forwarded the message (seen once in ~20 runs: the job failed without a word).
ABORT_GRACE_S = 0.2


def install_abort_hook(comm: Communicator) -> None:
    """On an uncaught exception: print it (prefixed with the rank), then ``comm.abort(1)`` ends every rank.

    Without it a rank that raises would exit alone and leave the others waiting in their next
    collective forever. Nothing is changed for a single process.
    """
    if comm.size <= 1:
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"rank {comm.rank} of {comm.size} failed:\n{text}")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # the launcher forwards the message before the abort tears its proxies down
        comm.abort(1)

    sys.excepthook = hook
