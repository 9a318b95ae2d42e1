"""``gpubptt train --distributed mpi|nccl``: the communicator, the rank checks, and no rank left waiting.

Every rank runs the same command under ``mpiexec``; rank 0 prints and writes the checkpoint, the
others train their share of the streams silently. A rank that fails prints its message and ends
the whole job (``abort_on_failure``), so no rank waits forever in a collective.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import typer

from ..distributed import KINDS, Communicator, DataParallel, install_abort_hook, make_communicator
from ..errors import InputError
from ._common import choices, in_flags, usage_error

DistributedChoice = choices("DistributedChoice", KINDS)

_active: list[Communicator] = []  # this process's communicator, once made: what abort_on_failure ends

# what MPI launchers set in each process they start: a size > 1 with --distributed none is a mistake
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")


def communicator_or_exit(kind: str, backend: str) -> Communicator:
    """This process's communicator for ``--distributed kind``, or ``error: ...`` and exit 2.

    With mpi on a GPU backend, GPU ``local_rank mod n`` is made current first (nccl does it itself).
    """
    if kind == "none":
        for var in _LAUNCHER_SIZE:
            if os.environ.get(var, "1").isdigit() and int(os.environ.get(var, "1")) > 1:
                raise usage_error(
                    f"this process is one of {os.environ[var]} started by an MPI launcher ({var}), but "
                    "--distributed is none: each would train alone and write the same checkpoint; "
                    "pass --distributed mpi (or nccl)"
                )
    try:
        comm = make_communicator(kind)
    except InputError as exc:
        raise usage_error(str(exc)) from exc
    if kind == "mpi" and backend != "numpy":
        from ..distributed.nccl import select_gpu

        select_gpu(comm.local_rank)  # before the backend makes its first array
    _active[:] = [comm]
    install_abort_hook(comm)
    return comm


def _abort(code: int) -> None:
    if _active and _active[0].size > 1:
        sys.stderr.write(f"rank {_active[0].rank} of {_active[0].size} stopped (exit status {code}): ending the job\n")
        _active[0].abort(code)


def abort_on_failure(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command, but a rank that exits non-zero or raises ends every rank of the job (after printing)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code:
                _abort(exc.exit_code)
            raise
        except KeyboardInterrupt:
            _abort(130)
            raise
        except Exception:
            if _active and _active[0].size > 1:
                traceback.print_exc()
            _abort(1)
            raise
        finally:
            _active.clear()

    return wrapper


def data_parallel_or_exit(comm: Communicator, kind: str, run: Any, fingerprint: Mapping[str, Any]) -> Any:
    """``DataParallel`` of the run's model over ``comm`` (None for --distributed none), or ``error: ...``, exit 2.

    Refuses more ranks than streams and ranks started with different options (``fingerprint``:
    what must be the same everywhere) before any training.
    """
    if kind == "none":
        return None
    text = "|".join(f"{k}={fingerprint[k]!r}" for k in sorted(fingerprint))
    try:
        return DataParallel(run.model, comm, batch_size=run.config.batch_size, fingerprint=text)
    except InputError as exc:
        raise usage_error(in_flags(str(exc))) from exc


def train_data_parallel(
    dp: DataParallel,
    run: Any,
    reporter: Any,
    train_loop: Callable[..., Any],
    *,
    max_memory: int | None = None,
    early_stop: int | None = None,
) -> None:
    """Train ``run`` on this rank's streams; the reporter's saves first gather every stream's state into run.state.

    ``max_memory``: each rank's budget for its own streams (``train``'s recomputation when over it).
    """
    local = dp.local_state(run.state)

    def sync() -> None:  # collective: every rank saves at the same steps
        g = dp.global_state(local)
        run.state.step, run.state.sequence, run.state.chunk, run.state.s = g.step, g.sequence, g.chunk, g.s

    reporter.sync = sync
    train_loop(
        dp, dp.shard_data(run.data), run.optimizer, dp.local_config(run.config), state=local, history=run.history,
        callback=reporter.on_step, evaluator=dp.evaluate, max_memory=max_memory, early_stop=early_stop,
    )  # fmt: skip
