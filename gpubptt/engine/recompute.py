"""Exact BPTT in O(√T) memory: keep the states at segment boundaries, recompute each segment backward.

Stored BPTT keeps every state s_t, O(T·B·H). With segments of c steps the forward
pass keeps only the state at the start of each segment, and the backward pass walks the segments
from last to first; for each it runs the segment's forward again from its boundary state (into
buffers of c steps), its output layer (loss, dV, dc and the direct terms ∂E_t/∂s_t), then BPTT
through the segment, layer by layer from the top:

    forward:   S_k = s_{k·c} for every segment k (per layer), the rest thrown away
    backward:  for k = last … 0:  recompute s_{k·c+1} … s_{(k+1)·c} from S_k
               G_t = ∂E_t/∂s_t (output layer, this segment's rows),  G_{end} += ∂E/∂s_{end} (carry)
               δ_t over the segment (the cell's ``run_backward``); its ∂E/∂s_{start} is the carry
               into segment k − 1 (or ds0 when k = 0); dW, dU, db, dV, dc accumulate over segments

The carry is exactly what the stored path adds at that step (δ_{t+1} @ W), so the gradient is the
stored path's: bitwise with one segment (c ≥ T), to rounding otherwise (the input projection's GEMM
runs over c·B rows rather than T·B, and the segment sums of dW, dU, dV and the loss are added in
another order). Memory: n_seg boundary states + c steps of states,
gradients and pre-activations per layer, for one extra forward pass (less the last segment, whose
states are still in the buffers when the backward pass starts). c ≈ √(T/3) minimises it; "sqrt"
takes c = ⌈√T⌉.

Scope. Unidirectional stacks of any depth (each layer's boundary states are kept; a layer's
gradient at step t needs the layer above only at step t, so segments go top-down). Refused, with
the reason: bidirectional models (the output layer at step t needs both directions' states at t,
but their backward passes walk time in opposite orders), dropout between layers (the masks are as
large as the states), ``truncate`` (its lanes would have to cross segment boundaries; chunked
truncation, a call per chunk with the carried state, already bounds memory). A cell that carries
state beyond s (``cell.extra_state``, an LSTM's c) keeps that state at every boundary too, and its
gradient crosses segment boundaries as the cell's direct term ``d_extra`` at the segment's last step.

On CuPy recomputation runs uncaptured (no CUDA graph): each segment's kernels are launched from
the host, without host syncs; the step kernels are the same as the stored path's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import ONEHOT_MAX_VOCAB, TokenPlan
from ..errors import InputError, InputTypeError
from ..validation import Batch, effective_truncate
from .losses import chunk_steps, xent_and_grads
from .memory import InsufficientMemoryError, MemoryEstimate, format_bytes
from .stack import check_dpre, input_projection, projection_bias, projection_into

__all__ = [
    "SegmentWorkspace",
    "call_memory",
    "check_max_memory",
    "check_recompute",
    "choose",
    "segment_length",
    "unsupported_reason",
]

INT64 = 8
PYTHON_OBJECTS = 10_000  # the workspace, its dicts and lists, the batch: measured 6–17 kB on small shapes


def check_recompute(recompute: Any) -> str | int | None:
    """None, "sqrt", "auto" or an int c ≥ 1 (segment length in steps); else InputTypeError/InputError."""
    if recompute is None or (isinstance(recompute, str) and recompute in ("sqrt", "auto")):
        return recompute
    if isinstance(recompute, str):
        raise InputError(
            f"unknown recompute {recompute!r}; expected None, 'sqrt', 'auto' or an int ≥ 1 (steps per segment)"
        )
    if isinstance(recompute, bool) or not isinstance(recompute, (int, np.integer)):
        raise InputTypeError(
            f"recompute must be None, 'sqrt', 'auto' or an int ≥ 1 (steps per segment), "
            f"got {type(recompute).__name__} {recompute!r}"
        )
    if recompute < 1:
        raise InputError(f"recompute (steps per segment) must be ≥ 1, got {recompute}")
    return int(recompute)


def check_max_memory(max_memory: Any) -> int | None:
    """None or a number of bytes ≥ 1 (an int, or a float such as 8 * 2**30), as an int."""
    if max_memory is None:
        return None
    if isinstance(max_memory, bool) or not isinstance(max_memory, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"max_memory must be None or a number of bytes > 0, got {type(max_memory).__name__}")
    whole = isinstance(max_memory, (int, np.integer))  # an int of any size is finite
    if not (max_memory >= 1 and (whole or math.isfinite(max_memory))):
        raise InputError(f"max_memory must be a finite number of bytes ≥ 1, got {max_memory}")
    return int(max_memory)


def segment_length(T: int, recompute: str | int) -> int:
    """Steps per segment: "sqrt" → ⌈√T⌉; an int c → min(c, T) (c ≥ T: one segment)."""
    c = math.isqrt(T - 1) + 1 if recompute == "sqrt" else int(recompute)
    return max(1, min(c, T))


def unsupported_reason(model: Any, *, truncate: int | None = None) -> str | None:
    """Why this model (and truncate) cannot recompute, or None when it can."""
    if model.num_directions == 2:
        return (
            "a bidirectional model cannot recompute: the output layer at step t needs both directions' states "
            "at t, and their backward passes walk time in opposite orders, so one segment's states would have "
            "to be recomputed for each direction and the output gradient kept for all T steps"
        )
    if model.dropout > 0 and model.num_layers > 1:
        return (
            f"dropout={model.dropout} between layers cannot be combined with recompute: the masks are as large "
            "as the states recomputation avoids storing"
        )
    if truncate is not None:
        return (
            "truncate cannot be combined with recompute: the truncated lanes would have to cross segment "
            "boundaries; for long streams use chunked truncation (one call per chunk, s0 = the previous "
            "final state), whose memory is already bounded by the chunk"
        )
    extra = getattr(model.cell, "extra_state", None)
    if extra is None:
        return f"cell {model.cell!r} does not declare extra_state (whether it carries state beyond s)"
    return None


# -- memory ------------------------------------------------------------------------------------------
def _common(model: Any, T: int, B: int, tokens: bool, lengths: bool) -> dict[str, int]:
    """What both policies hold: validated inputs beyond the caller's, the gradients and their returned copies."""
    it = model.dtype.itemsize
    n = len(model.recurrences)
    P = sum(int(np.prod(p.shape)) for p in model.params.values())
    parts = {"gradients (workspace and returned)": 2 * (P + n * B * model.hidden_size) * it}
    parts["Python objects"] = PYTHON_OBJECTS
    if lengths:  # the (T, B) weights and the targets with padded entries replaced (``check_batch``)
        parts["length masks"] = T * B * (it + INT64)
    return parts


def _xent_peak(n_rows: int, K: int, it: int) -> int:
    """One output-layer chunk of n rows: the (n, K) logits and the per-row vectors beside them."""
    return n_rows * K * it + n_rows * (5 * it + INT64)


def _token_peak(D: int, N: int, gH: int, it: int) -> int:
    """The larger of: the gather of N rows of U (NumPy's ``take`` buffers its (N, gH) output), the
    token plan and the scatter-add of N rows (NumPy: a (D, N) one-hot GEMM up to D = 512, else a gather)."""
    plan = 2 * N * INT64 + 2 * (D + 1) * INT64
    if D <= ONEHOT_MAX_VOCAB:
        scatter = D * N * it + N * INT64 + D * gH * it
    else:
        scatter = N * gH * it + min(D, N) * gH * it + 2 * (D + 1)
    return max(N * gH * it, plan + scatter)


def call_memory(
    model: Any,
    T: int,
    B: int,
    *,
    tokens: bool = True,
    lengths: bool = False,
    recompute: int | str | None = None,
    truncate: int | None = None,
) -> MemoryEstimate:
    """Bytes one ``loss_and_grads`` of a (T, B) batch holds at its peak, by part, on a model without a cached workspace.

    x (T, B) tokens or (T, B, D) dense (``tokens``), ``lengths`` given or not; ``recompute`` None (every
    state stored), "sqrt" or an int c (steps per segment). Counts what the call allocates: the
    workspace's buffers, the output layer's chunk, the token plan and scatter-add, the length masks,
    the gradients and their returned copies (not the caller's inputs nor the parameters). Measured
    against tracemalloc on NumPy within 10 % (``tests/test_recompute.py``).
    """
    it = model.dtype.itemsize
    cell, H, D, K = model.cell, model.hidden_size, model.input_size, model.output_size
    L, dirs = model.num_layers, model.num_directions
    n, gH = L * dirs, model.cell.gates * H
    ce = model._chunk_elements()
    parts = _common(model, T, B, tokens, lengths)
    if recompute is None:
        k = effective_truncate(truncate, T)
        inputs = T * B * (INT64 + (INT64 if tokens else D * it) + (it if lengths else 0))
        inputs += (T * B + D + 1) * INT64 if tokens else 0
        states = n * ((T + 1) * B * H + T * B * H + cell.buffer_elements(T, B, H)) + T * B * gH + B * H
        if dirs == 2:
            states += T * B * gH + L * T * B * 2 * H + T * B * 2 * H + T * B * INT64 // it
        if model.dropout > 0 and L > 1:
            states += 2 * (L - 1) * T * B * H * dirs
        states += 2 * (k + 1) * B * H if k is not None else 0
        states += D * gH if tokens else 0
        parts["inputs copied into the workspace"] = inputs
        parts["states and gradient buffers"] = states * it
        chunk = chunk_steps(T, B, K, ce)
        transient = max(_xent_peak(chunk * B, K, it), _token_peak(D, T * B, gH, it) if tokens else 0)
        parts["output-layer chunk or token scatter"] = transient
        return MemoryEstimate(parts)
    c = segment_length(T, recompute)
    n_seg = -(-T // c)
    last = T - (n_seg - 1) * c
    aux = cell.buffer_elements(c, B, H) + (cell.buffer_elements(last, B, H) if last != c else 0)
    extra = 2 if cell.extra_state else 1  # an LSTM keeps c at the boundaries too
    parts["boundary states"] = extra * n * n_seg * B * H * it
    segment = n * ((c + 1) * B * H + c * B * H + 2 * B * H + aux) + c * B * gH + B * H + (D * gH if tokens else 0)
    segment += (n * 2 * B * H + B * H) if cell.extra_state else 0  # its carry, final state and the carry in
    # each later segment's share of the cell's own gradients (W, …) lives only inside the backward pass, never
    # beside the returned copies of the gradients counted above, which are at least as large: nothing to add
    parts["segment buffers"] = segment * it + (B * INT64 if lengths else 0)
    chunk = min(c, chunk_steps(T, B, K, ce))
    transient = max(_xent_peak(chunk * B, K, it), _token_peak(D, c * B, gH, it) if tokens else 0)
    parts["output-layer chunk or token scatter"] = transient
    return MemoryEstimate(parts)


def _candidates(T: int) -> list[int]:
    """Segment lengths worth considering: for each segment count, the shortest c that gives it (ascending)."""
    r = math.isqrt(T) + 1
    return sorted({*range(1, min(T, r) + 1), *(-(-T // m) for m in range(1, r + 1))})


def choose(
    model: Any,
    T: int,
    B: int,
    *,
    tokens: bool,
    lengths: bool,
    recompute: int | str | None,
    max_memory: int | None,
    truncate: int | None = None,
    held: int = 0,
) -> int | None:
    """The segment length a call runs with (None: every state stored), after checking ``max_memory``.
    ``held``: bytes the call already holds beside what ``call_memory`` counts (its copies of the caller's
    inputs in the dtypes it computes in), added to every policy's estimate.

    "auto": the stored path if it fits, else the fewest segments that fit (the least recomputation
    and per-segment overhead), each as short as that count allows. InsufficientMemoryError, before any work, when
    the policy's estimate exceeds ``max_memory``, naming the estimate and the smallest budget
    that would work (for this policy, and for any policy); InputError when the model cannot
    recompute and recomputation is asked for.
    """
    truncate = effective_truncate(truncate, T)  # a window over every step: full BPTT, which can recompute
    why = unsupported_reason(model, truncate=truncate)

    def est(r: int | None) -> int:
        return held + call_memory(model, T, B, tokens=tokens, lengths=lengths, recompute=r, truncate=truncate).total

    if recompute is not None and recompute != "auto" and why is not None:
        raise InputError(why)
    if max_memory is None:
        if recompute == "auto":
            raise InputError("recompute='auto' needs max_memory (bytes): it picks the fastest policy that fits")
        return None if recompute is None else segment_length(T, recompute)
    cands = [] if why is not None else _candidates(T)
    sizes = {c: est(c) for c in cands}
    best = min(sizes.values(), default=None)
    stored = est(None)
    smallest = stored if best is None else min(best, stored)

    def refuse(what: str, need: int) -> InsufficientMemoryError:
        tail = f"; the smallest budget that works is {smallest} bytes ({format_bytes(smallest)})"
        if best is not None and best < stored:
            c_min = min(sizes, key=sizes.get)
            tail += f", with recompute={c_min}"
        elif why is not None and recompute in (None, "auto"):
            tail += f" (recomputation is not available: {why})"
        return InsufficientMemoryError(
            f"{what} needs about {need} bytes ({format_bytes(need)}), but max_memory is {max_memory} bytes "
            f"({format_bytes(max_memory)}){tail}"
        )

    if recompute == "auto":
        if stored <= max_memory:
            return None
        fits = [c for c in cands if sizes[c] <= max_memory]
        if not fits:
            raise refuse(f"loss_and_grads of T={T}, B={B} (any policy)", smallest)
        return max(fits)
    if recompute is None:
        if stored > max_memory:
            raise refuse(f"loss_and_grads of T={T}, B={B} with every state stored", stored)
        return None
    c = segment_length(T, recompute)
    need = est(c)
    if need > max_memory:
        raise refuse(f"loss_and_grads of T={T}, B={B} with recompute={recompute!r} (segments of {c})", need)
    return c


# -- the computation ---------------------------------------------------------------------------------
class SegmentWorkspace:
    """The buffers of forward+BPTT with recomputation for one (T, B) and segment length c.

    Per recurrence (layer): boundary states Sb (n_seg, B, H) (Sb[k] = s_{k·c}), segment states
    S (c+1, B, H), gradients G (c, B, H), the carry ∂E/∂s at a segment's start (B, H), the cell's
    buffers per segment length; shared: pre (c, B, gates·H), scratch, the dU scatter target for
    tokens. Outputs: ``loss`` (0-d), ``grads`` (like the params, plus "s0" (L, B, H)), ``final``
    (L, B, H) each layer's state after its last valid step.
    """

    def __init__(self, model: Any, batch: Batch, c: int, *, step_kernels: str, chunk_elements: int) -> None:
        be, xp, dt = model.backend, model.backend.xp, model.dtype
        T, B, D, H = batch.T, batch.B, model.input_size, model.hidden_size
        cell, recs = model.cell, model.recurrences
        self.model, self.be, self.c, self.T, self.B = model, be, c, T, B
        self.tokens, self.step_kernels = batch.tokens, step_kernels
        self.bounds = [(t0, min(T, t0 + c)) for t0 in range(0, T, c)]
        sizes = sorted({t1 - t0 for t0, t1 in self.bounds})
        self.Sb = [xp.empty((len(self.bounds), B, H), dtype=dt) for _ in recs]
        self.S = [xp.zeros((c + 1, B, H), dtype=dt) for _ in recs]
        self.G = [xp.empty((c, B, H), dtype=dt) for _ in recs]
        self.carry = [xp.empty((B, H), dtype=dt) for _ in recs]
        self.aux = {n: [cell.buffers(n, B, H, xp=xp, dtype=dt) for _ in recs] for n in sizes}
        self.pre = xp.empty((c, B, cell.gates * H), dtype=dt)
        self.scratch = xp.empty((B, H), dtype=dt)
        self.dUT = xp.empty((D, cell.gates * H), dtype=dt) if batch.tokens else None
        self.chunk = min(c, chunk_steps(T, B, model.output_size, chunk_elements))
        self.final = xp.empty((len(recs), B, H), dtype=dt)
        self.loss = xp.zeros((), dtype=dt)
        self.grads = {k: xp.empty_like(v) for k, v in model.params.items()}
        self.grads["s0"] = xp.empty((len(recs), B, H), dtype=dt)
        self.extra = cell.extra_state  # an LSTM's "c0": c kept at boundaries, its gradient carried
        if self.extra:
            self.Cb = [xp.empty((len(self.bounds), B, H), dtype=dt) for _ in recs]
            self.carry_c = [xp.empty((B, H), dtype=dt) for _ in recs]
            self.carry_c_in = xp.empty((B, H), dtype=dt)  # the carry into a segment's end (the cell clears its own)
            self.final_c = xp.empty((len(recs), B, H), dtype=dt)
            self.grads[self.extra] = xp.empty((len(recs), B, H), dtype=dt)
        self.batch: Batch | None = None
        self.final_at: dict[int, tuple[Any, Any]] = {}

    def describe(self) -> dict[str, Any]:
        """T, B, tokens, recompute (steps per segment), segments."""
        return {"T": self.T, "B": self.B, "tokens": self.tokens, "recompute": self.c, "segments": len(self.bounds)}

    def load(self, batch: Batch) -> None:
        """Take the validated batch (its arrays are read in place: nothing is captured) and s0."""
        self.batch = batch
        for i, Sb in enumerate(self.Sb):
            Sb[0] = 0 if batch.s0_stacked is None else batch.s0_stacked[i]
            if self.extra:
                self.Cb[i][0] = 0 if batch.c0_stacked is None else batch.c0_stacked[i]
        self.final_at = {}
        if batch.lengths is not None:  # S[len_b] is each sequence's final state: which segment holds it
            n = batch.lengths
            k = np.where(n > 0, (n - 1) // self.c, 0)
            for seg in np.unique(k):
                cols = np.flatnonzero(k == seg)
                self.final_at[int(seg)] = (self.be.asarray(n[cols] - seg * self.c), self.be.asarray(cols))

    def _forward_segment(self, k: int) -> None:
        """Every layer's states over segment k from its boundary states (into S[l][:n+1])."""
        be, model, batch = self.be, self.model, self.batch
        cell = model.cell
        t0, t1 = self.bounds[k]
        n = t1 - t0
        for r in model.recurrences:
            q = model.recurrence_params(r)
            b = projection_bias(cell, q, be)
            S, aux = self.S[r.index][: n + 1], self.aux[n][r.index]
            X = batch.x[t0:t1] if r.layer == 0 else self.S[r.index - 1][1 : n + 1]
            S[0] = self.Sb[r.index][k]
            cell.load(aux, self.Cb[r.index][k] if self.extra else None)
            pre = projection_into(cell, aux, self.pre[:n], be)
            input_projection(q["U"], b, X, self.tokens and r.layer == 0, be=be, out=pre)
            cell.run_forward(pre, q, S, aux, be=be, scratch=self.scratch, step_kernels=self.step_kernels)

    def run(self) -> None:
        """Forward (keeping boundary states), then backward segment by segment, recomputing each."""
        self.forward()
        self.loss[...] = 0
        self.backward(self._xent_head)

    def _xent_head(self, k: int, top: Any, dS: Any) -> None:
        """The per-step softmax head on segment k: loss, dV, dc and the direct terms ∂E_t/∂s_t into dS."""
        t0, t1 = self.bounds[k]
        batch, p, g = self.batch, self.model.params, self.grads
        weight = None if batch.weight is None else batch.weight[t0:t1]
        self.loss += xent_and_grads(
            top, p["V"], p.get("c"), batch.y[t0:t1], weight, be=self.be, dS=dS,
            dV=g["V"], dc=g.get("c"), chunk=self.chunk, accumulate=k != len(self.bounds) - 1,
        )  # fmt: skip

    def forward(self, states: Any = None) -> None:
        """The checkpointing forward pass: boundary states and final states kept, the rest thrown away;
        ``states`` (T, B, H), if given, receives the top layer's s_t (what ``vjp`` returns)."""
        model, batch = self.model, self.batch
        recs = model.recurrences
        last = len(self.bounds) - 1
        for k, (t0, t1) in enumerate(self.bounds):
            self._forward_segment(k)
            n = t1 - t0
            if states is not None:
                states[t0:t1] = self.S[recs[-1].index][1 : n + 1]
            for r in recs:
                C = model.cell.cell_states(self.aux[n][r.index]) if self.extra else None
                if k < last:
                    self.Sb[r.index][k + 1] = self.S[r.index][n]
                    if C is not None:
                        self.Cb[r.index][k + 1] = C[n]
                elif batch.lengths is None:
                    self.final[r.index] = self.S[r.index][n]
                    if C is not None:
                        self.final_c[r.index] = C[n]
                if k in self.final_at:
                    rows, cols = self.final_at[k]
                    self.final[r.index][cols] = self.S[r.index][rows, cols]
                    if C is not None:
                        self.final_c[r.index][cols] = C[rows, cols]

    def backward(self, head: Any, *, inject: Any = None, dx: Any = None) -> None:
        """Backward segment by segment, last first, recomputing each segment's states.

        ``head(k, top, dS)`` writes ∂E/∂s_t of the top layer over segment k (top its states (n, B, H))
        into dS (n, B, H) and accumulates whatever else it computes; ``inject(k, i, G)`` adds further
        direct terms to recurrence i's G (n, B, H) over segment k (and, for a cell with extra state, its
        ∂E/∂c_t into ``d_extra`` {row: [(cols, values)]}, passed as a fourth argument); ``dx`` (T, B, D)
        receives ∂E/∂x for dense x. Writes the recurrent gradients and "s0" into ``grads``.
        """
        be, xp, model, batch, g = self.be, self.be.xp, self.model, self.batch, self.grads
        cell, recs = model.cell, model.recurrences
        last = len(self.bounds) - 1
        if self.dUT is not None:
            self.dUT[...] = 0
        part: dict[str, Any] = {}  # one segment's share of the cell's own gradients (W, …)
        for k in range(last, -1, -1):
            t0, t1 = self.bounds[k]
            n, first = t1 - t0, k == last
            if not first:
                self._forward_segment(k)  # the last segment's states are still in place
            top = self.S[recs[-1].index][1 : n + 1]  # the top layer's s_t over the segment
            head(k, top, self.G[recs[-1].index][:n])
            plan = be.token_plan(batch.x[t0:t1].reshape(-1), model.input_size) if self.tokens else None
            for r in reversed(recs):
                q, G = model.recurrence_params(r), self.G[r.index][:n]
                mine = {key: g[r.name(key)] for key in q if r.name(key) in g}
                if not first:
                    G[n - 1] += self.carry[r.index]  # ∂E/∂s at the segment's end from the later segments
                d_extra: dict[int, list[tuple[Any, Any]]] | None = {} if self.extra else None
                if inject is not None:
                    inject(k, r.index, G, d_extra)
                own = [key for key in mine if key not in ("U", cell.input_bias)]
                if not first:
                    for key in own:
                        if key + r.suffix not in part:  # made once (setdefault would make a copy every time)
                            part[key + r.suffix] = xp.empty_like(mine[key])
                into = mine if first else {**mine, **{key: part[key + r.suffix] for key in own}}
                more = {}
                if self.extra:  # ∂E/∂c at the segment's end from the later segments; ∂E/∂c at its start out
                    if not first:
                        self.carry_c_in[...] = self.carry_c[r.index]  # the cell writes its carry out there
                        d_extra.setdefault(n - 1, []).append((slice(None), self.carry_c_in))
                    into[self.extra] = g[self.extra][r.index] if k == 0 else self.carry_c[r.index]
                    more = {"d_extra": d_extra}
                dpre = cell.run_backward(
                    G, q, self.S[r.index][: n + 1], self.aux[n][r.index], be=be, work=self.pre[:n],
                    scratch=self.scratch, step_kernels=self.step_kernels, truncate=None, lanes=None, grads=into,
                    ds0=g["s0"][r.index] if k == 0 else self.carry[r.index], **more,
                )  # fmt: skip
                check_dpre(cell, dpre, (n, self.B, cell.gates * model.hidden_size))
                if not first:
                    for key in own:
                        mine[key] += into[key]
                rows = dpre.reshape(n * self.B, dpre.shape[2])  # ∂E/∂pre over the segment's rows
                if cell.input_bias and cell.input_bias in mine:
                    if first:
                        be.sum_rows(rows, out=mine[cell.input_bias])
                    else:
                        mine[cell.input_bias] += be.sum_rows(rows)
                if r.layer == 0 and self.tokens:
                    be.token_scatter_add(self.dUT, TokenPlan(plan.perm, plan.offsets), rows)
                else:
                    X = batch.x[t0:t1] if r.layer == 0 else self.S[r.index - 1][1 : n + 1]
                    be.matmul(rows.T, X.reshape(n * self.B, -1), mine["U"], accumulate=not first)
                if r.layer > 0:  # ∂E/∂(the layer below's states) at the same steps
                    below = self.G[r.index - 1][:n]
                    be.matmul(rows, q["U"], below.reshape(n * self.B, below.shape[2]))
                elif dx is not None:  # ∂E/∂x at the same steps
                    be.matmul(rows, q["U"], dx[t0:t1].reshape(n * self.B, dx.shape[2]))
        if self.dUT is not None:
            g["U"][...] = self.dUT.T
