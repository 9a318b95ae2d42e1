"""The composable half of ``RNN``: the recurrent stack's pullback (``vjp``) and the heads other than the
fused per-step softmax, which run on top of it (mixed into ``RNN``; the math lives in
``gpubptt.engine.pullback`` and ``gpubptt.heads``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .engine import recompute as _recompute
from .engine.pullback import Pullback, VJPOutput
from .errors import InputError, ShapeError
from .heads import check_targets, head_loss_and_grads
from .validation import NOTHING_COUNTED, Batch

__all__ = ["Composable"]


class Composable:
    """``vjp`` and the non-fused heads' loss of a model (mixed into ``RNN``)."""

    def vjp(
        self, x: Any, s0: Any = None, *, lengths: Any = None, recompute: int | str | None = None
    ) -> tuple[VJPOutput, Pullback]:
        """The recurrent stack forward (no output layer, no dropout) and its pullback (``gpubptt.engine.pullback``).

        x (T, B) token ids or (T, B, D) floats; s0 as in ``forward``; lengths (B,). Returns (out,
        pullback): out.states (T, B, H·dirs), out.final_state as ``forward``'s; ``pullback(d_states,
        d_final_state=None)`` → the exact gradients of every recurrent parameter, "s0" (and "c0") and,
        for dense x, "x", for the upstream gradients ∂E/∂states (T, B, H·dirs) and ∂E/∂final_state.
        Callable once. ``recompute`` as in ``loss_and_grads`` (None, "sqrt" or an int c: steps per
        segment; not "auto"): the forward keeps only the states at segment boundaries (and the top layer's
        outputs it returns) and the pullback recomputes each segment, for the models recomputation
        serves (``gpubptt.engine.recompute``: one direction, no dropout between layers; an LSTM keeps c at the
        boundaries). Once the pullback has run, the model keeps its forward buffers for the next ``vjp`` of
        this shape (one set per shape, at most four shapes); ``pullback.release()`` hands them back unused.
        """
        recompute = _recompute.check_recompute(recompute)
        if recompute == "auto":
            raise InputError("vjp takes recompute None, 'sqrt' or an int (steps per segment), not 'auto'")
        if recompute is not None:
            why = _recompute.unsupported_reason(self)
            if why:
                raise InputError(why)
        batch = self._own_inputs(self._check_nonempty(self._swap(x, "x"), s0, lengths, "vjp"), x, s0)
        out, pullback = self._vjp(batch, recompute=recompute)
        out.states = self._out(out.states)
        return out, pullback

    def _own_inputs(self, batch: Batch, x: Any, s0: Any) -> Batch:
        """``batch`` with private copies of x and the initial states wherever they may still be the caller's own
        arrays (validation converts without copying where the dtype already fits): the pullback reads them when
        it is called, after the caller may have refilled its buffers."""
        xp = self.backend.xp
        given = [a for a in (x, *(s0 if isinstance(s0, tuple) else (s0,))) if isinstance(a, xp.ndarray)]

        def own(a: Any) -> Any:
            if a is None or not any(xp.may_share_memory(a, g) for g in given):
                return a
            return a.copy()

        return dataclasses.replace(batch, x=own(batch.x), s0_stacked=own(batch.s0_stacked),
                                   c0_stacked=own(batch.c0_stacked))  # fmt: skip

    def _check_nonempty(self, x: Any, s0: Any, lengths: Any, what: str) -> Batch:
        batch = self._check(x, None, s0, lengths, for_loss=False)
        if batch.T == 0 or batch.B == 0:
            raise ShapeError(f"{what} needs at least one time step and one sequence; got T={batch.T}, B={batch.B}")
        return batch

    def _vjp(
        self, batch: Batch, *, want_dx: bool = True, recompute: int | str | None = None
    ) -> tuple[VJPOutput, Pullback]:
        if recompute is not None:
            c = _recompute.segment_length(batch.T, recompute)
            sk, xp, chunk = self._step_kernels(), self.backend.xp, self._chunk_elements()
            key = self._spare_key("segments", batch.T, batch.B, batch.tokens, c)
            with self._lock:
                ws = self._take_spare(key)
                if ws is None:
                    ws = _recompute.SegmentWorkspace(self, batch, c, step_kernels=sk, chunk_elements=chunk)
                ws.load(batch)
                states = xp.empty((batch.T, batch.B, self.hidden_size), dtype=self.dtype)
                ws.forward(states)
                final = ws.final.copy()
                final_c = ws.final_c.copy() if ws.extra else None
            if batch.weight is not None:
                states *= batch.weight[:, :, None]
            final = final[0] if batch.flat_state else final
            if final_c is not None:
                final = (final, final_c[0] if batch.flat_state else final_c)
            pullback = Pullback(
                self, batch, None, sk, batch_first=self.batch_first, want_dx=want_dx, segments=ws, spare=key
            )
            return VJPOutput(states=states, final_state=final), pullback
        key = self._spare_key("stack", batch.T, batch.B)
        with self._lock:  # one call of this model at a time (see loss_and_grads)
            stack = self._stack(batch, spare=key)  # the buffers of a finished pullback of this shape, or fresh ones
            states = stack.Y[-1]
            final = self._final_state(stack, batch)  # fresh arrays, as the states: the stack is given back
            states = states * batch.weight[:, :, None] if batch.weight is not None else states.copy()
        pullback = Pullback(
            self, batch, stack, self._step_kernels(), batch_first=self.batch_first, want_dx=want_dx, spare=key
        )
        return VJPOutput(states=states, final_state=final), pullback

    def _head_loss(
        self, head: str | None, x: Any, y: Any, s0: Any, lengths: Any, reduction: str, grads: bool, drop: bool = True
    ) -> tuple[Any, dict[str, Any] | None, Any]:
        """(loss, grads or None, final state) under a head other than the fused "softmax" one; ``drop``: whether
        the call would apply the model's dropout (``loss_and_grads`` does; ``loss`` only with a dropout_seed)."""
        if head is None:
            raise InputError("this model has no output head (head=None): use model.vjp(x) with your own loss")
        if drop and self.dropout > 0 and self.num_layers > 1:
            raise InputError(
                f"dropout={self.dropout} between layers runs under the 'softmax' head only; head {head!r} is "
                "computed without dropout: set model.dropout = 0 for it"
            )
        batch = self._check_nonempty(self._swap(x, "x"), s0, lengths, f"head {head!r}")
        y = self._swap_targets(y, x) if head == "mse" else y
        y = check_targets(
            head, y, batch.T, batch.B, self.output_size, be=self.backend, dtype=self.dtype, weight=batch.weight
        )
        if reduction == "mean" and batch.lengths is not None and not batch.lengths.any():  # as the softmax head
            raise InputError(NOTHING_COUNTED)
        out, pullback = self._vjp(batch, want_dx=False)
        V, c = self.params["V"], self.params.get("c")
        loss, dY, dV, dc, count = head_loss_and_grads(
            head, out.states, V, c, y, batch.weight, batch.lengths, self.num_directions, batch.count, be=self.backend
        )
        scale = 1.0 if reduction == "sum" else 1.0 / max(count, 1)
        if not grads:
            pullback.release()
            return loss * scale, None, out.final_state
        g = pullback(self._out(dY))
        g["V"] = dV
        if dc is not None:
            g["c"] = dc
        if scale != 1.0:
            loss = loss * scale
            for k in g:
                g[k] *= scale
        return loss, g, out.final_state
