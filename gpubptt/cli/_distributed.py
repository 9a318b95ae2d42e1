"""``gpubptt train --distributed mpi|nccl``: the communicator, the rank checks, and no rank left waiting.

Every rank runs the same command under ``mpiexec``; rank 0 prints and writes the checkpoint, the
others train their share of the streams silently.

No rank waits forever. Under a launch of several ranks every process joins MPI first
(``communicator_or_exit``), even one started with ``--distributed none``, then runs its checks
before any work. The ranks meet once (``agree_or_exit``): a rank that refuses its options goes
to that meeting at once with its message, the others when their checks pass; if any rank
refused, every rank prints the refusals and exits 2, together. After the meeting, a rank that
fails prints its message and ends the whole job (``abort_on_failure``: MPI_Abort). Only a
process that cannot join MPI at all (mpi4py missing on its node) still exits alone.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import typer

from ..distributed import (
    ABORT_GRACE_S,
    KINDS,
    Communicator,
    DataParallel,
    LocalCommunicator,
    allgather_text,
    install_abort_hook,
)  # fmt: skip
from ..errors import InputError
from ._common import StderrProxy, choices, in_flags, usage_error

DistributedChoice = choices("DistributedChoice", KINDS)

_active: list[Communicator] = []  # this process's communicator, once made: what abort_on_failure ends

# what MPI launchers set in each process they start: a size > 1 with --distributed none is a mistake
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE")
# what says the launcher can be reached (MPICH's PMI, PMIx, Open MPI): such a process can join the others
_LAUNCHER_LINK = ("PMI_FD", "PMI_PORT", "PMIX_NAMESPACE", "OMPI_COMM_WORLD_RANK")


class _Recorder(StderrProxy):
    """sys.stderr, keeping what is written through it: a refusing rank's ``error: ...`` for the others."""

    def __init__(self, kind: str) -> None:
        super().__init__(sys.stderr)
        self.kind, self.text = kind, []

    def write(self, s: Any) -> int:
        if isinstance(s, str):
            self.text.append(s)
        return self.stream.write(s)

    def message(self) -> str | None:
        """What followed the first ``error: `` written, or None."""
        text = "".join(self.text)
        i = text.find("error: ")
        return text[i + len("error: ") :].strip() if i >= 0 else None

    def close_recording(self) -> None:
        if sys.stderr is self:
            sys.stderr = self.stream


_pending: list[_Recorder] = []  # set from joining a multi-rank job until its ranks have agreed
_stopped: list[bool] = []  # the ranks agreed to stop: each exits by itself, nothing to abort


def _launched() -> tuple[int, str] | None:
    """(ranks, variable) when an MPI launcher started this process as one of several, else None."""
    for var in _LAUNCHER_SIZE:
        value = os.environ.get(var, "1")
        if value.isdigit() and int(value) > 1:
            return int(value), var
    return None


def communicator_or_exit(kind: str, backend: str) -> Communicator:
    """This process's communicator for ``--distributed kind`` (MPI's world for mpi and nccl), or exit 2.

    Call it before any other check: under a multi-rank launch it opens the pre-flight checks that
    ``agree_or_exit`` closes, so a refusal in between reaches every rank. A process launched as one
    of several with ``--distributed none`` joins MPI too, to refuse at the meeting (alone only
    where it cannot join). With mpi or nccl on a GPU backend, GPU ``local_rank mod n`` is made
    current first; NCCL itself is set up once the ranks have agreed (``data_parallel_or_exit``).
    """
    from ..distributed.mpi import MPICommunicator, cuda_aware_mpi, import_mpi

    refusal = None
    if kind == "none":
        launched = _launched()
        if launched is None:
            return LocalCommunicator()
        refusal = (
            f"this process is one of {launched[0]} started by an MPI launcher ({launched[1]}), but "
            "--distributed is none: each would train alone and write the same checkpoint; "
            "pass --distributed mpi (or nccl)"
        )
        if not any(var in os.environ for var in _LAUNCHER_LINK):
            raise usage_error(refusal)
        try:
            import_mpi()
        except InputError as exc:  # cannot join the others: refuse alone
            raise usage_error(refusal) from exc
    elif kind not in KINDS:
        raise usage_error(f"unknown distributed kind {kind!r}; expected one of {', '.join(KINDS)}")
    try:
        import_mpi()
    except InputError as exc:  # cannot join the others: refuse alone
        raise usage_error(str(exc)) from exc
    world = MPICommunicator(cuda_aware=False)  # joined: from here every refusal reaches every rank
    _active[:] = [world]
    install_abort_hook(world)
    if world.size > 1:
        _pending[:] = [_Recorder(kind)]
        sys.stderr = _pending[0]
    if refusal is not None:
        raise usage_error(refusal)
    try:
        world.cuda_aware = cuda_aware_mpi(world.MPI)
        if kind == "nccl":
            from ..distributed.nccl import check_nccl

            check_nccl(world.local_rank)
        elif backend != "numpy":
            from ..distributed.nccl import select_gpu

            select_gpu(world.local_rank)  # before the backend makes its first array
    except InputError as exc:
        raise usage_error(str(exc)) from exc
    return world


def refusals_of(said: list[str]) -> dict[int, str]:
    """What each rank said at the meeting ("kind\\n" then "!message" or nothing) → {rank: why it refuses}.

    A rank refuses with its own message, or for a ``--distributed`` other than rank 0's.
    """
    got = [text.split("\n", 1) for text in said]
    refusals = {r: text[1:] for r, (_, text) in enumerate(got) if text.startswith("!")}
    for r, (kind, _) in enumerate(got):
        if kind != got[0][0]:
            refusals.setdefault(
                r, f"started with --distributed {kind}, rank 0 with --distributed {got[0][0]}: start every rank "
                "with the same command"
            )  # fmt: skip
    return refusals


def _meet(refusal: str | None) -> dict[int, str]:
    """The one meeting of a multi-rank job's ranks (collective): every rank's refusal, the same on every rank.

    ``refusal`` this rank's (already printed), None if its checks passed. Ranks started with
    another ``--distributed`` than rank 0's are refused too. Prints every refusal but this rank's own.
    """
    recorder = _pending.pop()
    recorder.close_recording()
    comm = _active[0]
    mine = "" if refusal is None else "!" + refusal
    refusals = refusals_of(allgather_text(comm, f"{recorder.kind}\n{mine}"))
    for r, text in sorted(refusals.items()):
        if r != comm.rank or refusal is None:
            typer.echo(f"error: rank {r} of {comm.size} refused to start: {text}", err=True)
    if refusals:
        _stopped[:] = [True]
    return refusals


def agree_or_exit() -> None:
    """Where the ranks of a multi-rank job agree to start (collective); exit 2 on every rank if any refused.

    Nothing for one process. Call it after every check that comes before work, before any other
    collective.
    """
    if _pending and _meet(None):
        raise typer.Exit(2)


def _abort(code: int) -> None:
    if _active and _active[0].size > 1:
        sys.stderr.write(f"rank {_active[0].rank} of {_active[0].size} stopped (exit status {code}): ending the job\n")
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # the launcher forwards what this rank printed before the abort ends it
        _active[0].abort(code)


def abort_on_failure(command: Callable[..., Any]) -> Callable[..., Any]:
    """The command, but a rank that exits non-zero or raises ends every rank of the job (after printing).

    Before the ranks have agreed to start (``agree_or_exit``), a rank that exits non-zero takes its
    message to the meeting instead, and every rank exits on its own.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code and _pending:  # refused before the ranks agreed: tell them, stop together
                _meet(_pending[0].message() or f"exit status {exc.exit_code}")
            elif exc.exit_code and not _stopped:
                _abort(exc.exit_code)
            raise
        except KeyboardInterrupt:
            _abort(130)
            raise
        except SystemExit as exc:  # sys.exit() somewhere below: a non-zero one ends the job like typer's exit
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code and not _stopped:
                _abort(code)
            raise
        except Exception:
            if _active and _active[0].size > 1:
                traceback.print_exc()
            _abort(1)
            raise
        finally:
            for recorder in _pending:
                recorder.close_recording()
            _pending.clear()
            _stopped.clear()
            _active.clear()

    return wrapper


def data_parallel_or_exit(comm: Communicator, kind: str, run: Any, fingerprint: Mapping[str, Any]) -> Any:
    """``DataParallel`` of the run's model over ``comm`` (None for --distributed none), or ``error: ...``, exit 2.

    First the ranks agree that every rank's checks passed (``agree_or_exit``); nccl is set up
    over ``comm`` (the MPI world) then. Refuses more ranks than streams and ranks started with
    different options (``fingerprint``: what must be the same everywhere) before any training.
    """
    if kind == "none":
        return None
    agree_or_exit()
    if kind == "nccl":
        from ..distributed.nccl import NCCLCommunicator

        try:
            comm = NCCLCommunicator(comm)  # the ranks agreed: all of them set NCCL up
        except InputError as exc:
            raise usage_error(str(exc)) from exc
        _active[:] = [comm]
        install_abort_hook(comm)
    text = "|".join(f"{k}={fingerprint[k]!r}" for k in sorted(fingerprint))
    try:
        return DataParallel(run.model, comm, batch_size=run.config.batch_size, fingerprint=text)
    except InputError as exc:  # decided from what the ranks exchanged: every rank refuses alike
        _stopped[:] = [True]
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
    reporter.local_state = local  # the step this rank is at (run.state moves at saves only), for messages

    def sync() -> None:  # collective: every rank saves at the same steps
        g = dp.global_state(local)
        run.state.step, run.state.sequence, run.state.chunk, run.state.s = g.step, g.sequence, g.chunk, g.s

    reporter.sync = sync
    train_loop(
        dp, dp.shard_data(run.data), run.optimizer, dp.local_config(run.config), state=local, history=run.history,
        callback=reporter.on_step, evaluator=dp.evaluate, max_memory=max_memory, early_stop=early_stop,
    )  # fmt: skip
