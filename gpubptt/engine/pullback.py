"""The recurrent stack's pullback (vector–Jacobian product): exact BPTT under any loss.

``model.vjp(x, s0)`` runs the stack forward (no output layer) and returns its outputs and a pullback:

    out.states       (T, B, H·dirs)  the top layer's outputs Y (zero on padded steps)
    out.final_state  torch's h_n (L·dirs, B, H), or (B, H) as s0 was; an LSTM's (h_n, c_n)
    pullback(dY, d_final)  →  {U…, W…, b…: ∂E/∂θ, "s0": ∂E/∂s0, ["c0"], ["x": ∂E/∂x for dense x]}

for E any scalar function of (Y, h_n) whose gradients dY = ∂E/∂Y and d_final = ∂E/∂h_n the caller
supplies (dY None: zero, for a loss on h_n alone; ``want_dx=False`` skips ∂E/∂x and its GEMM). The
backward pass is the engine's (``engine.backward_stack``), the one ``loss_and_grads`` runs under its
softmax head: dY enters as the top layer's direct term; ∂E/∂h_n enters each
recurrence at its own last valid step (forward: lengths[b] − 1; reverse: its own step lengths[b] − 1,
input step 0), ∂E/∂c_n the same way into the LSTM's cell-state recursion, and straight into ∂E/∂s0
where a length is 0. Padded steps' outputs are constant zeros: their dY is ignored.

A pullback holds the forward's buffers until it is called; it can be called once (its backward
pass consumes them, as torch frees a graph): a second call raises ``PullbackError``. It reads the
model's parameters when called: change them in between and the gradient is of neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError, ShapeError
from ..validation import Batch, _as_native, check_bool
from . import stack as engine

__all__ = ["Pullback", "PullbackError", "VJPOutput"]


class PullbackError(InputError):
    """A pullback was called a second time (its forward buffers are consumed by the first call)."""


@dataclass(eq=False)  # equal when the same object (== on its arrays is elementwise)
class VJPOutput:
    """What ``RNN.vjp`` returns beside the pullback: states (T, B, H·dirs) the top layer's outputs
    (zero on padded steps), final_state torch's h_n (L·dirs, B, H) or (B, H) as s0 was (an LSTM's:
    the tuple (h_n, c_n))."""

    states: Any
    final_state: Any


class Pullback:
    """``pullback(d_states, d_final_state=None, *, want_dx=True)`` → gradients; see the module docstring.

    d_states (T, B, H·dirs) on the model's backend, or None (zero); d_final_state shaped like
    ``final_state`` (an LSTM's: (dh_n, dc_n), either may be None), or None. Returns a dict: every
    recurrent parameter's gradient by name (not V, c: the output layer is the caller's), "s0" shaped
    like the final state, "c0" for an LSTM, "x" (T, B, D) for dense x unless ``want_dx`` is False.
    Fresh arrays, the caller's.
    """

    def __init__(
        self,
        model: Any,
        batch: Batch,
        stack: engine.Stack,
        step_kernels: str,
        *,
        batch_first: bool = False,
        want_dx: bool = True,
        segments: Any = None,
        spare: tuple | None = None,
    ) -> None:
        self._model, self._batch, self._stack, self._step_kernels = model, batch, stack, step_kernels
        self._batch_first, self._want_dx = batch_first, want_dx
        self._segments = segments  # a recompute.SegmentWorkspace after its forward pass, or None
        self._spare = spare  # the key under which the forward's buffers go back to the model when done, or None
        self._used = False

    def __repr__(self) -> str:
        b = self._batch
        return f"Pullback(T={b.T}, B={b.B}, {'used' if self._used else 'ready'})"

    def release(self) -> None:
        """Give the forward's buffers back to the model unused (no gradient wanted: a loss without grads, a
        forward under ``torch.no_grad``), for its next ``vjp`` of this shape. The pullback cannot be called
        after; releasing one that was called or released already does nothing."""
        model = self._model
        with model._lock:
            if self._used:
                return
            self._used = True
            self._give_back()

    def _give_back(self) -> None:
        """Hand the forward's buffers (stack or segment workspace) to the model for reuse; this pullback drops them."""
        buffers = self._stack if self._stack is not None else self._segments
        if self._segments is not None:
            self._segments.batch = None  # the workspace read the caller's arrays in place: do not keep them
        self._stack = self._segments = None
        if buffers is not None and self._spare is not None:
            self._model._give_spare(self._spare, buffers)

    def _array(self, a: Any, shape: tuple[int, ...], what: str) -> Any:
        model = self._model
        be = model.backend
        a = _as_native(be, a, what)  # a ragged nested list: a ShapeError naming it, not NumPy's
        if a.dtype.kind != "f":
            raise InputTypeError(f"{what} must be floating point, got dtype {a.dtype}")
        if tuple(a.shape) != shape:
            raise ShapeError(f"{what} must have shape {shape} (as the vjp's output), got {tuple(a.shape)}")
        with np.errstate(over="ignore"):
            cast = a.astype(model.dtype, copy=False)
        if cast.dtype.itemsize < a.dtype.itemsize:  # narrowing: a finite value past the dtype's range must not
            xp = be.xp  # become inf (NaN and inf given as such pass on, as torch's gradients do)
            if bool((xp.isfinite(a) & ~xp.isfinite(cast)).any()):
                biggest = float(xp.abs(xp.where(xp.isfinite(a), a, 0)).max())
                raise InputError(
                    f"{what} has values too large for {model.dtype.name} (|value| up to {biggest:.3g}); it must be "
                    f"finite in the model's dtype"
                )
        return cast

    def _finals(self, d_final: Any) -> tuple[Any, Any]:
        """(∂E/∂h_n, ∂E/∂c_n) as (L·dirs, B, H) arrays or None, checked against the final state's shape."""
        model, batch = self._model, self._batch
        n, B, H = model.num_states, batch.B, model.hidden_size
        shape = (B, H) if batch.flat_state else (n, B, H)
        extra = model.cell.extra_state
        if d_final is None:
            return None, None
        if extra:
            if not isinstance(d_final, (tuple, list)) or len(d_final) != 2:
                raise InputTypeError(
                    f"d_final_state of an LSTM must be the pair (dh_n, dc_n) (either may be None), "
                    f"got {type(d_final).__name__}"
                )
            dh, dc = d_final
        else:
            if isinstance(d_final, (tuple, list)):
                raise InputTypeError(f"d_final_state must be one array {shape}, got a {type(d_final).__name__}")
            dh, dc = d_final, None
        dh = None if dh is None else self._array(dh, shape, "d_final_state (∂E/∂h_n)").reshape(n, B, H)
        dc = None if dc is None else self._array(dc, shape, "d_final_state (∂E/∂c_n)").reshape(n, B, H)
        return dh, dc

    def __call__(self, d_states: Any, d_final_state: Any = None, *, want_dx: bool = True) -> dict[str, Any]:
        model, batch = self._model, self._batch
        if self._used:
            raise PullbackError(
                "this pullback was already called (or released): its backward pass consumes the forward's "
                "buffers; call model.vjp again for another gradient"
            )
        want_dx = check_bool(want_dx, "want_dx")
        T, B, H, dirs = batch.T, batch.B, model.hidden_size, model.num_directions
        shape = (B, T, H * dirs) if self._batch_first else (T, B, H * dirs)
        dtop = None if d_states is None else self._array(d_states, shape, "d_states")
        dtop = dtop.swapaxes(0, 1) if self._batch_first and dtop is not None else dtop
        dh, dc = self._finals(d_final_state)
        want_dx = self._want_dx and want_dx
        with model._lock:
            if self._used:  # again under the lock: two threads calling one pullback, the second is refused
                raise PullbackError("this pullback was already called (from another thread); call model.vjp again")
            self._used = True
            if self._segments is not None:
                g, dx = self._recompute_backward(dtop, dh, dc, want_dx)
            else:
                g, dx = self._stored_backward(dtop, dh, dc, want_dx)
        extra = model.cell.extra_state
        for k in ("s0", extra) if extra else ("s0",):
            if batch.flat_state:
                g[k] = g[k][0]
        if dx is not None:
            g["x"] = dx.swapaxes(0, 1) if self._batch_first else dx
        return g

    def _top_gradient(self, dtop: Any, out: Any) -> Any:
        """dtop into ``out`` (T, B, H·dirs), zero on padded steps: padded outputs are constants; None: zero."""
        weight = self._batch.weight
        if dtop is None:
            out.fill(0)
        elif weight is None:
            out[...] = dtop
        else:
            self._model.backend.xp.multiply(dtop, weight[:, :, None], out=out)
        return out

    def _recompute_backward(self, dtop: Any, dh: Any, dc: Any, want_dx: bool) -> tuple[dict[str, Any], Any]:
        """The segment-by-segment backward pass of ``gpubptt.engine.recompute`` under the upstream gradients."""
        model, batch, ws = self._model, self._batch, self._segments
        xp, c = model.backend.xp, ws.c
        T, B, H = batch.T, batch.B, model.hidden_size
        top = self._top_gradient(dtop, xp.empty((T, B, H * model.num_directions), dtype=model.dtype))
        _, _, empty = _last_steps(batch, model.backend)
        given = dh is not None or dc is not None
        rows_at: dict[int, dict[int, Any]] = {}  # segment → {row within it: the columns whose last step it is}
        for t, j in _by_last_step(batch, model.backend).items() if given else ():
            rows_at.setdefault(t // c, {})[t % c] = j

        def head(k: int, _top: Any, dS: Any) -> None:
            t0, t1 = ws.bounds[k]
            dS[...] = top[t0:t1]

        def inject(k: int, i: int, G: Any, d_extra: dict[int, list[tuple[Any, Any]]] | None = None) -> None:
            for row, j in rows_at.get(k, {}).items():  # the rows of segment k where sequences end
                if dh is not None:
                    G[row, j] += dh[i][j]
                if dc is not None and d_extra is not None:  # the cell's direct term on c
                    d_extra.setdefault(row, []).append((j, dc[i][j]))

        dx = None if batch.tokens or not want_dx else xp.empty((T, B, model.input_size), model.dtype)
        ws.backward(head, inject=inject if given else None, dx=dx)
        g = {k: v.copy() for k, v in ws.grads.items() if k not in ("V", "c")}
        self._give_back()  # every result is a copy: the workspace serves the next vjp of this shape
        if empty is not None and dh is not None:
            g["s0"][:, empty] += dh[:, empty]
        if empty is not None and dc is not None:
            g[model.cell.extra_state][:, empty] += dc[:, empty]
        return g, dx

    def _stored_backward(self, dtop: Any, dh: Any, dc: Any, want_dx: bool) -> tuple[dict[str, Any], Any]:
        """``engine.backward_stack`` over the stored forward, under the upstream gradients."""
        model, batch = self._model, self._batch
        be, xp = model.backend, model.backend.xp
        T, B, H, n = batch.T, batch.B, model.hidden_size, model.num_states
        dirs = model.num_directions
        st, dt = self._stack, model.dtype
        G, dY = st.backward_buffers()
        self._top_gradient(dtop, G[-1] if dirs == 1 else dY)
        g = {k: xp.empty_like(v) for k, v in model.params.items() if k not in ("V", "c")}
        g["s0"] = xp.empty((n, B, H), dtype=dt)
        extra = model.cell.extra_state
        if extra:
            g[extra] = xp.empty((n, B, H), dtype=dt)
        last, cols, empty = _last_steps(batch, be)
        inject = None
        if dh is not None:

            def inject(i: int, Gi: Any) -> None:
                Gi[last, cols] += dh[i][cols]  # h_n is each recurrence's state after its own last valid step

        d_extra = None
        if dc is not None:  # ∂E/∂c_n enters each sequence's last valid step, grouped by that step
            d_extra = [{t: [(j, dc[i][j])] for t, j in _by_last_step(batch, be).items()} for i in range(n)]
        dx = None if batch.tokens or not want_dx else xp.empty((T, B, model.input_size), dtype=dt)
        plan = be.token_plan(batch.x.reshape(-1), model.input_size) if batch.tokens else None
        dUT = xp.empty((model.input_size, model.cell.gates * H), dtype=dt) if batch.tokens else None
        engine.backward_stack(
            model, st, G, dY, g, batch.x, batch.tokens, plan, step_kernels=self._step_kernels,
            truncate=None, lanes=None, dUT=dUT, inject=inject, d_extra=d_extra, dx=dx,
        )  # fmt: skip
        if empty is not None:  # a sequence of length 0: its final state is s0
            if dh is not None:
                g["s0"][:, empty] += dh[:, empty]
            if dc is not None:
                g[extra][:, empty] += dc[:, empty]
        self._give_back()  # the forward's buffers go with the first call, to the model's next vjp of this shape
        return g, dx


def _by_last_step(batch: Batch, be: Any) -> dict[int, Any]:
    """{t: the columns (a slice, or the backend's index array) of the sequences whose last valid step is t},
    for the sequences of length ≥ 1 (grouped on the host: lengths live there)."""
    if batch.lengths is None:
        return {batch.T - 1: slice(None)}
    n = batch.lengths
    cols = np.flatnonzero(n > 0)
    return {int(t): be.asarray(cols[n[cols] - 1 == t]) for t in np.unique(n[cols] - 1)}


def _last_steps(batch: Batch, be: Any) -> tuple[Any, Any, Any]:
    """(rows, cols, empty): each sequence's last valid step and its column, for sequences of length ≥ 1;
    ``empty`` the columns of length 0 (None when there are none)."""
    if batch.lengths is None:
        return batch.T - 1, slice(None), None
    n = batch.lengths
    cols = np.flatnonzero(n > 0)
    empty = np.flatnonzero(n == 0)
    return (
        be.asarray(n[cols] - 1),
        be.asarray(cols),
        be.asarray(empty) if empty.size else None,
    )
