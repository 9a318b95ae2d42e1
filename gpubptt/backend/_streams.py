"""Independent jobs on CUDA side streams, forked from the current stream and joined back to it: the CuPy
backend's ``run_concurrently`` where ``concurrent`` is on (the two directions of a bidirectional layer).

Each job is queued in turn from the calling thread (kernel launches and GEMMs are asynchronous), job 0 on the
current stream and job i ≥ 1 on side stream i, which first waits for an event recorded on the current stream
(the fork: everything queued there before is done first); the current stream then waits for an event recorded
on each side stream after its job (the join: everything queued there after sees both). Inside a CUDA graph
capture the same waits pull the side streams into the capture, and the graph holds the jobs as parallel
branches. Each side stream has its own cuBLAS workspace (``add_stream``): two GEMMs in flight at once never
share one.

The side streams and events are made once per thread and device, outside any capture (the warm-up run that
precedes a capture makes them), and reused: an event's last record is what a wait sees. So every graph a thread
captures, and its eager calls, share that thread's side streams, their workspaces and their bf16 scratch: safe
while that work is ordered, i.e. queued from that thread on one current stream (as the model's calls are). A
graph replayed by another thread, or on another stream, while this thread's side work runs, is not ordered
with it: give each such thread its own models.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["SideStreams"]


class SideStreams:
    """Side streams with their fork and join events, per thread and device; ``run(jobs)`` forks, queues and
    joins. ``add_stream(ptr)``: called once per new side stream (the cuBLAS workspace of its own)."""

    def __init__(self, cp: ModuleType, add_stream: Callable[[int], None]) -> None:
        self.cp = cp
        self.add_stream = add_stream
        self._local = threading.local()

    def _sides(self, n: int) -> tuple[Any, list[tuple[Any, Any]]]:
        """(fork event, [(side stream, join event)] × n) of this thread on the current device."""
        cp = self.cp
        sets = self._local.__dict__.setdefault("sets", {})
        device = cp.cuda.Device().id
        if device not in sets:  # made once (setdefault would make an event on every run, captures included)
            sets[device] = (cp.cuda.Event(disable_timing=True), [])
        fork, sides = sets[device]
        while len(sides) < n:
            stream = cp.cuda.Stream(non_blocking=True)
            self.add_stream(stream.ptr)
            sides.append((stream, cp.cuda.Event(disable_timing=True)))
        return fork, sides[:n]

    def run(self, jobs: list[Callable[[], None]]) -> None:
        """jobs[0] on the current stream, jobs[i] on side stream i, all after the work queued so far and before
        any queued after. A job that raises stops the rest from being queued; every side stream already
        forked is joined all the same (a capture must end joined), and the first error is raised."""
        origin = self.cp.cuda.get_current_stream()
        fork, sides = self._sides(len(jobs) - 1)
        fork.record(origin)
        forked = []
        try:
            for job, (stream, joined) in zip(jobs[1:], sides, strict=True):
                stream.wait_event(fork)
                forked.append((stream, joined))
                with stream:
                    job()
            jobs[0]()
        except BaseException:
            with contextlib.suppress(Exception):  # the job's error is the one to see, not a join's after it
                self._join(origin, forked)
            raise
        self._join(origin, forked)

    @staticmethod
    def _join(origin: Any, forked: list[tuple[Any, Any]]) -> None:
        """The origin stream waits for everything queued so far on each forked side stream."""
        for stream, joined in forked:
            joined.record(stream)
            origin.wait_event(joined)
