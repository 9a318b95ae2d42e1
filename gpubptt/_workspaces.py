"""The per-shape buffers of ``RNN`` (mixed into it): forward+BPTT workspaces and recomputation
workspaces, cached per shape of work, least recently used first, at most ``MAX_WORKSPACES``."""

from __future__ import annotations

from typing import Any

from .engine import recompute as _recompute
from .engine import stack as engine
from .errors import InputError
from .validation import Batch, _check_truncate, check_positive_int, effective_truncate

__all__ = ["MAX_WORKSPACES", "Workspaces"]

MAX_WORKSPACES = 4


class Workspaces:
    """``memory_estimate``, ``workspaces()`` and the cached buffers a model's calls run in (mixed into
    ``RNN``)."""

    def memory_estimate(
        self,
        T: int,
        B: int,
        *,
        tokens: bool = True,
        lengths: bool = False,
        recompute: int | str | None = None,
        truncate: int | None = None,
    ) -> Any:
        """Bytes a ``loss_and_grads`` of a (T, B) batch holds at its peak, by part (a ``memory.MemoryEstimate``).

        ``tokens``: x (T, B) ids, else (T, B, D) floats; ``lengths`` given or not; ``recompute`` None,
        "sqrt" or an int (steps per segment); ``truncate`` as in ``loss_and_grads``. ``.total`` is the sum.
        Not counted: what a process keeps once, whatever the call (under MKL each thread's packed-weight buffer,
        about the size of the largest step weight, made at its first packed GEMM and kept).
        """
        T, B = check_positive_int(T, "T"), check_positive_int(B, "B")
        recompute = _recompute.check_recompute(recompute)
        if recompute == "auto":
            raise InputError("memory_estimate needs a policy: None, 'sqrt' or an int (steps per segment), not 'auto'")
        truncate = _check_truncate(truncate)
        truncate = effective_truncate(truncate, T)  # a window over every step: full BPTT (as the call runs it)
        if recompute is not None:
            why = _recompute.unsupported_reason(self, truncate=truncate)
            if why:
                raise InputError(why)
        return _recompute.call_memory(
            self, T, B, tokens=bool(tokens), lengths=bool(lengths), recompute=recompute, truncate=truncate
        )

    def _segment_workspace(self, batch: Batch, c: int) -> _recompute.SegmentWorkspace:
        """The cached recomputation buffers for this shape and segment length (cached like ``_workspace``)."""
        step_kernels, chunk_elements = self._step_kernels(), self._chunk_elements()
        key = ("recompute", batch.T, batch.B, batch.tokens, c, step_kernels, chunk_elements)
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = _recompute.SegmentWorkspace(self, batch, c, step_kernels=step_kernels, chunk_elements=chunk_elements)
            while len(self._workspaces) >= MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[key] = ws
        return ws

    def _spare_key(self, kind: str, *shape: Any) -> tuple:
        """The key of a spare set of ``kind`` buffers ("stack": a forward Stack, "segments": a recomputation
        workspace) for this shape of work, on this backend and precision. ``_take_spare`` and ``_give_spare``
        add the placement current when they run (on a GPU, the device and stream): a set is given back under
        the stream its last work (the backward pass) was queued on, and reused on that stream only, where that
        work runs first."""
        be = self.backend
        return (kind, *shape, be.name, be.precision, self._step_kernels(), self._chunk_elements())

    def _take_spare(self, key: tuple) -> Any:
        """The spare buffers kept under ``key`` on the current placement (taken: no one else gets them until
        they are given back), or None."""
        with self._lock:
            return self._spares.pop((*key, self.backend.placement()), None)

    def _give_spare(self, key: tuple, buffers: Any) -> None:
        """Keep ``buffers``, which no one uses any more (a pullback's, after its backward pass), for the next
        ``vjp`` of the same shape: reusing them spares the allocation and the first touch of every page of
        the forward's buffers (the page faults of fresh arrays of many MB). One set per key, at most
        ``MAX_WORKSPACES`` keys, least recently given back dropped first."""
        key = (*key, self.backend.placement())  # where the work that last used them was queued
        with self._lock:
            self._spares.pop(key, None)
            while len(self._spares) >= MAX_WORKSPACES:
                self._spares.pop(next(iter(self._spares)))
            self._spares[key] = buffers

    def workspaces(self) -> list[dict[str, Any]]:
        """The cached forward+BPTT workspaces, least recently used first (at most MAX_WORKSPACES).

        Each a dict: T, B, tokens, lengths, truncate (None: full BPTT), dropout, use_graphs, step_kernels,
        chunk (time steps per output-layer chunk) and captured (replayed as one CUDA graph).
        """
        with self._lock:
            return [ws.describe() for ws in self._workspaces.values()]

    def _workspace(self, batch: Batch, truncate: int | None) -> engine.Workspace:
        """The cached buffers (and, on CuPy, the captured graph) for this shape of work."""
        truncate = effective_truncate(truncate, batch.T)
        be = self.backend
        step_kernels, chunk_elements = self._step_kernels(), self._chunk_elements()
        dropout = self.dropout if self.num_layers > 1 else 0.0
        key = (
            batch.T, batch.B, batch.tokens, batch.weight is not None, truncate, self.use_graphs, step_kernels,
            chunk_elements, dropout, tuple(be.data_ptr(p) for p in self.params.values()),
        )  # fmt: skip
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = engine.Workspace(
                self, batch, truncate, step_kernels=step_kernels, chunk_elements=chunk_elements, dropout=dropout
            )
            while len(self._workspaces) >= MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[key] = ws  # most recently used last
        return ws
