"""The engine: runs a cell over time, batched and time-major, with exact or truncated BPTT.

Rows are examples; S[0] = s0 and S[t+1] = s_t, so S has T+1 steps. For a cell with input weight U,
recurrent weight W and bias b (pre-activations ``pre_t = U x_t + b + W s_{t-1}``):

    forward:   pre = U x + b for all steps (ONE GEMM, or a gather for token ids), then the cell's
               recurrence over t
    output:    the loss and ∂E_t/∂s_t of the softmax layer, over time chunks (``losses``)
    backward:  the cell turns ∂E_t/∂s_t into δ_t (∂E/∂pre_t) in place, then
               dW = Σ_t δ_tᵀ s_{t-1}    dU = Σ_t δ_tᵀ x_t    db = Σ_t δ_t    ds0 = δ_0 @ W
               each ONE GEMM (or one deterministic scatter-add for tokens) over all T·B rows

Only the cell's two recurrences are sequential; they run over preallocated buffers with ``out=``:
nothing is allocated per step. The engine knows no cell's math: it asks the cell for ``forward``,
``factors`` (the diagonal of ∂s_t/∂pre_t), ``backward`` and, for truncation, ``step_back`` and
``enter``.

Truncation (``truncate=k``) is the classic tutorial scheme: the gradient of E_t flows back through
steps t, t−1, …, t−k only. Step j then receives the contributions of E_j … E_{j+k}; each is carried
in its own "lane" (lane d holds E_{j+d}'s contribution), all lanes advance with one GEMM per step.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np

from ..backend import Backend, TokenPlan
from ..dropout import dropout_masks, mask_key
from ..errors import InputError
from ..validation import Batch
from .losses import chunk_steps, xent_and_grads

__all__ = [
    "Stack",
    "Workspace",
    "backward_stack",
    "gather_rows",
    "input_projection",
    "input_weight_grad",
    "projection_bias",
    "projection_into",
    "reverse_index",
    "states",
]


def input_projection(U: Any, b: Any, x: Any, tokens: bool, *, be: Backend, out: Any) -> Any:
    """U x_t (+ b) for all steps at once into ``out`` (T, B, H).

    Tokens x (T, B): a column gather of U (the one-hot product, never a dense one-hot matrix).
    Dense x (T, B, D): one GEMM (T·B, D) × (D, H).
    """
    T, B, H = out.shape
    if tokens:
        be.xp.take(U.T, x.reshape(-1), axis=0, out=out.reshape(T * B, H))
    else:
        be.matmul(x.reshape(T * B, x.shape[-1]), U.T, out.reshape(T * B, H))
    if b is not None:
        out += b
    return out


def projection_bias(cell: Any, q: dict[str, Any], be: Backend) -> Any:
    """The bias the engine adds in a recurrence's input projection → b (gates·H,), the cell's ``input_bias`` from its
    parameters ``q``; or None where it has none, or where its ``run_forward`` adds it itself
    (``Cell.adds_input_bias``)."""
    if not cell.input_bias or cell.adds_input_bias(be):
        return None
    return q.get(cell.input_bias)


def projection_into(cell: Any, aux: dict[str, Any], pre: Any, be: Backend) -> Any:
    """The buffer a recurrence's input projection goes into: the cell's own ``projection_buffer`` (its forward then
    works in place there), else the engine's ``pre``."""
    own = cell.projection_buffer(aux, be)
    return pre if own is None else own


def input_weight_grad(
    delta: Any, x: Any, tokens: bool, plan: TokenPlan | None, *, be: Backend, out: Any, scratch: Any = None
) -> Any:
    """dU = Σ_t δ_tᵀ x_t into ``out`` (H, D); delta (T, B, H).

    Dense x (T, B, D): one GEMM (H, T·B) × (T·B, D). Tokens: one deterministic scatter-add of the
    T·B rows of δ into the columns of U (``scratch`` (D, H) receives it before the transpose).
    """
    xp = be.xp
    H, D = out.shape
    rows = delta.reshape(-1, H)  # (T·B, H)
    if not tokens:
        be.matmul(rows.T, x.reshape(-1, D), out)
        return out
    dUT = scratch if scratch is not None else xp.empty((D, H), dtype=out.dtype)
    dUT[...] = 0
    be.token_scatter_add(dUT, plan, rows)
    out[...] = dUT.T
    return out


def reverse_index(T: int, B: int, lengths: np.ndarray | None) -> np.ndarray:
    """Rows (T·B,) of the per-sequence time reversal: row t·B + b ↔ (len_b − 1 − t)·B + b for t < len_b.

    Padded steps (t ≥ len_b) stay in place, so in its own time a reverse recurrence starts at each
    sequence's last valid step, as with packed sequences. The map is its own inverse.
    """
    t = np.arange(T)[:, None]
    if lengths is None:
        r = np.broadcast_to(T - 1 - t, (T, B))
    else:
        n = np.asarray(lengths, dtype=np.int64)[None, :]
        r = np.where(t < n, n - 1 - t, t)
    return (r * B + np.arange(B)[None, :]).reshape(-1).astype(np.int64)


def gather_rows(src: Any, index: Any, *, be: Backend, out: Any) -> Any:
    """out[i] = src[index[i]] over the T·B rows of (T, B, H) arrays (out contiguous; a src that is not, such as a
    batch-first input's swapped view, is copied first): one gather, or one per ``be.row_blocks`` block at once (a
    gather is memory-bound: two cores copy a (T·B, 4H) = (2048, 1024) float32 buffer in 0.57 ms against 0.71 ms
    on one, 2-core VM)."""
    T, B, H = out.shape
    rows, into = src.reshape(T * B, H), out.reshape(T * B, H)
    blocks = be.row_blocks(T * B, out.size)
    be.run_concurrently([functools.partial(be.take_rows, rows, index[b], into[b]) for b in blocks])
    return out


class Stack:
    """The forward buffers of a stack of recurrences for one (T, B): states, pre-activations, layer outputs.

    Per recurrence i (``model.recurrences``, torch's order) S[i] (T+1, B, H) in that recurrence's
    own time (S[i][0] = its s0; a reverse recurrence runs over the per-sequence reversal of time,
    ``reverse_index``). Layer l's output Y[l] (T, B, H·dirs) in input time: [forward, reverse]
    states (for one direction, a view of S). X[l] the input of layer l ≥ 1: Y[l−1], or Y[l−1] ⊙ M[l−1]
    with dropout (M the inverted dropout masks, 0 or 1/(1−p)). One (T, B, gates·H) ``pre`` serves every
    recurrence in turn (where the cell names none of its own buffers, ``Cell.projection_buffer``); ``tmp``
    (T, B, gates·H; a reverse direction's input gathered into its own time passes through it), ``tmp_h``
    (T, B, H) (``tmp`` itself for one gate), ``rev`` (T·B,) and ``rev_ids`` (T·B, 1) (token ids in a reverse
    direction's time) exist with two directions.
    """

    def __init__(self, model: Any, T: int, B: int, *, dropout: bool) -> None:
        xp, dt = model.backend.xp, model.dtype
        H, L, dirs = model.hidden_size, model.num_layers, model.num_directions
        self.model, self.be, self.T, self.B = model, model.backend, T, B
        self.recs = model.recurrences
        gH = model.cell.gates * H
        self.S = [xp.zeros((T + 1, B, H), dtype=dt) for _ in self.recs]
        self.aux = [model.cell.buffers(T, B, H, xp=xp, dtype=dt) for _ in self.recs]
        self.pre = xp.empty((T, B, gH), dtype=dt)
        self.scratch = xp.empty((B, H), dtype=dt)
        self.scratch_rev = xp.empty((B, H), dtype=dt) if dirs == 2 else None  # the reverse direction's, run at once
        self.tmp = xp.empty((T, B, gH), dtype=dt) if dirs == 2 else None
        self.tmp_h = self.tmp if dirs == 1 or gH == H else xp.empty((T, B, H), dtype=dt)
        self.rev = xp.empty(T * B, dtype=xp.int64) if dirs == 2 else None
        self.rev_ids = xp.empty((T * B, 1), dtype=xp.int64) if dirs == 2 else None  # token ids in reverse time
        self.Y = [self.S[l][1:] if dirs == 1 else xp.empty((T, B, 2 * H), dtype=dt) for l in range(L)]
        self.M = [xp.empty((T, B, H * dirs), dtype=dt) for _ in range(L - 1)] if dropout else None
        self.X = [None] + [xp.empty((T, B, H * dirs), dtype=dt) if dropout else self.Y[l] for l in range(L - 1)]
        self._backward: tuple[list[Any], Any] | None = None  # backward_buffers(), made on first use

    def backward_buffers(self) -> tuple[list[Any], Any]:
        """(G, dY) for a pullback over these buffers: G per recurrence (T, B, H), the direct terms ∂E/∂s_t;
        dY (T, B, 2H), ∂E/∂(a layer's output), with two directions, else None. Made on first use and kept
        with the stack, so a reused stack brings them (the backward pass overwrites them)."""
        if self._backward is None:
            xp, dt, (T, B, H) = self.be.xp, self.model.dtype, self.S[0][1:].shape
            G = [xp.empty((T, B, H), dtype=dt) for _ in self.recs]
            self._backward = (G, xp.empty((T, B, 2 * H), dtype=dt) if self.model.num_directions == 2 else None)
        return self._backward

    def load(self, s0: Any, lengths: np.ndarray | None, state0: Any = None) -> None:
        """Initial states from s0 (L·dirs, B, H) or None (zeros), any further cell state from ``state0``
        (the cell's ``load``); the reversal from lengths."""
        for i, S in enumerate(self.S):
            S[0] = 0 if s0 is None else s0[i]
            self.model.cell.load(self.aux[i], None if state0 is None else state0[i])
        if self.rev is not None:
            self.rev[...] = self.be.asarray(reverse_index(self.T, self.B, lengths))

    def draw_masks(self, key: Any, p: float, offset: int = 0) -> None:
        """Inverted dropout masks for the outputs of every layer but the last: 0 with probability p, else 1/(1−p).

        ``key`` an int seed or a backend generator (one draw: ``dropout.mask_key``); ``offset`` the
        index of this batch's first example in the global batch (a rank's first stream; 0 in one
        process). Entry [t, b, u] of layer l's mask is a hash of (key, l, t, offset + b, u)
        (``gpubptt.dropout``), so the examples of a global batch get the same masks however it is split.
        """
        dropout_masks(self.M or [], mask_key(key, be=self.be), p, offset=offset, be=self.be)

    def run(self, x: Any, tokens: bool, *, step_kernels: str) -> Any:
        """Every recurrence forward, layer by layer; returns the top layer's output Y (T, B, H·dirs).

        Layer l's input projection is one GEMM (a gather for token ids) per direction over all T
        steps, run when layer l − 1 is finished.
        """
        be, model = self.be, self.model
        cell, H = model.cell, model.hidden_size
        for l in range(model.num_layers):
            X = x if l == 0 else self.X[l]
            recs = self.recs[l * model.num_directions : (l + 1) * model.num_directions]
            if model.num_directions == 2:  # both directions' projections first, then their recurrences at once
                self._run_pair(recs, X, tokens and l == 0, step_kernels)
            for r in recs if model.num_directions == 1 else ():
                q = model.recurrence_params(r)
                b = projection_bias(cell, q, be)
                S, aux = self.S[r.index], self.aux[r.index]
                pre = projection_into(cell, aux, self.pre, be)
                input_projection(q["U"], b, X, tokens and l == 0, be=be, out=pre)
                cell.run_forward(pre, q, S, aux, be=be, scratch=self.scratch, step_kernels=step_kernels)
            if model.num_directions == 2:
                f, r = self.S[2 * l], self.S[2 * l + 1]
                self.Y[l][..., :H] = f[1:]
                self.Y[l][..., H:] = gather_rows(r[1:], self.rev, be=be, out=self.tmp_h)
            if self.M is not None and l < model.num_layers - 1:
                be.xp.multiply(self.Y[l], self.M[l], out=self.X[l + 1])
        return self.Y[-1]

    def _run_pair(self, recs: list[Any], X: Any, tokens: bool, step_kernels: str) -> None:
        """A bidirectional layer's two recurrences forward, at once where the backend runs jobs concurrently
        (``Backend.run_concurrently``): the reverse one on ``pre``, projected from its input in its own time (the
        input gathered into ``tmp``: no wider than pre where D ≤ gates·H; token ids gathered; else pre projected
        into ``tmp`` and gathered), then the forward one projected on ``tmp``; each with its own scratch. A cell's
        own ``projection_buffer`` takes the place of ``pre`` or ``tmp``."""
        be, cell, model = self.be, self.model.cell, self.model
        jobs = []
        for r in sorted(recs, key=lambda r: -r.direction):  # the reverse one first: it frees tmp
            pre, scratch = (self.pre, self.scratch_rev) if r.direction == 1 else (self.tmp, self.scratch)
            S, aux = self.S[r.index], self.aux[r.index]
            pre = projection_into(cell, aux, pre, be)
            q = model.recurrence_params(r)
            b = projection_bias(cell, q, be)
            if r.direction == 0:
                input_projection(q["U"], b, X, tokens, be=be, out=pre)
            elif tokens:  # the reverse direction's time: its token ids gathered
                ids = be.take_rows(X.reshape(-1, 1), self.rev, self.rev_ids)
                input_projection(q["U"], b, ids.reshape(X.shape), True, be=be, out=pre)
            elif X.shape[2] <= self.tmp.shape[2]:  # its input gathered into tmp
                Xr = gather_rows(X, self.rev, be=be, out=self.tmp.reshape(-1)[: X.size].reshape(X.shape))
                input_projection(q["U"], b, Xr, False, be=be, out=pre)
            else:  # its projection gathered
                input_projection(q["U"], b, X, False, be=be, out=self.tmp)
                gather_rows(self.tmp, self.rev, be=be, out=pre)
            jobs.append(lambda q=q, S=S, aux=aux, pre=pre, scratch=scratch: cell.run_forward(
                pre, q, S, aux, be=be, scratch=scratch, step_kernels=step_kernels))  # fmt: skip
        be.run_concurrently(jobs)

    def final_states(self, lengths: np.ndarray | None) -> Any:
        """Each recurrence's state after its last valid step, (L·dirs, B, H) (a fresh array).

        Forward: at step lengths[b] − 1; reverse: at step 0 (the end of its own time); s0 where the length is 0.
        """
        xp = self.be.xp
        if lengths is None:
            return xp.stack([S[self.T] for S in self.S])
        rows, cols = self.be.asarray(lengths), xp.arange(self.B)
        return xp.stack([S[rows, cols] for S in self.S])  # S[len] = the state after step len − 1

    def final_cell_states(self, lengths: np.ndarray | None) -> Any:
        """The cell's further state (an LSTM's c) after each recurrence's last valid step, (L·dirs, B, H)
        (a fresh array) as ``final_states``; None for a cell without one."""
        C = [self.model.cell.cell_states(aux) for aux in self.aux]
        if C[0] is None:
            return None
        xp = self.be.xp
        if lengths is None:
            return xp.stack([c[self.T] for c in C])
        rows, cols = self.be.asarray(lengths), xp.arange(self.B)
        return xp.stack([c[rows, cols] for c in C])


def states(model: Any, batch: Batch, *, step_kernels: str | None = None) -> list[Any]:
    """Every recurrence's states on a validated batch: [S (T+1, B, H)] in ``model.recurrences`` order (fresh).

    S[0] is the recurrence's s0 and S[t+1] its state after its t-th step in its own time (a reverse
    recurrence's step t is input step len_b − 1 − t). ``step_kernels`` None: the model's own choice
    (``model._step_kernels()``: its setting, and cuBLAS GEMMs under a reduced precision).
    """
    stack = Stack(model, batch.T, batch.B, dropout=False)
    stack.load(batch.s0_stacked, batch.lengths, batch.c0_stacked)
    stack.run(batch.x, batch.tokens, step_kernels=model._step_kernels() if step_kernels is None else step_kernels)
    return stack.S


class Workspace:
    """Every buffer one forward+BPTT needs for one shape, allocated once and reused.

    Inputs are copied into fixed buffers, so the same computation (or its captured CUDA graph)
    runs on every call; outputs land in ``loss`` (0-d) and ``grads`` (shaped like the params,
    plus "s0" (L·dirs, B, H), and the cell's ``extra_state`` ("c0" for an LSTM) alike). ``model``
    supplies the cell, the parameters, the dtype, the layers and ``use_graphs``; ``step_kernels``
    picks the cell's kernels, ``chunk_elements`` sizes the output-layer chunks; ``dropout`` p > 0
    keeps mask buffers, drawn at each ``load``.
    """

    def __init__(
        self,
        model: Any,
        batch: Batch,
        truncate: int | None,
        *,
        step_kernels: str,
        chunk_elements: int,
        dropout: float = 0.0,
    ) -> None:
        be, xp, dt = model.backend, model.backend.xp, model.dtype
        T, B, D, H = batch.T, batch.B, model.input_size, model.hidden_size
        dirs = model.num_directions
        self.model, self.be, self.truncate, self.tokens = model, be, truncate, batch.tokens
        self.step_kernels, self.dropout = step_kernels, dropout
        self.use_graphs = model.use_graphs
        self.needs_capture = bool(model.use_graphs and be.supports_graphs)
        self._run: Any = None  # a captured graph's replay, or None: compute (no bound method kept: no cycle to self)
        self._captured = False
        # inputs
        self.x = xp.empty((T, B), dtype=xp.int64) if batch.tokens else xp.empty((T, B, D), dtype=dt)
        self.y = xp.empty((T, B), dtype=xp.int64)
        self.weight = None if batch.weight is None else xp.empty((T, B), dtype=dt)
        self.perm = xp.empty(T * B, dtype=xp.int64) if batch.tokens else None
        self.offsets = xp.empty(D + 1, dtype=xp.int64) if batch.tokens else None
        # work
        self.stack = Stack(model, T, B, dropout=dropout > 0 and model.num_layers > 1)
        self.S = self.stack.S[0]  # the first recurrence's states (all of them for the one-layer model)
        # per recurrence: the direct term ∂E/∂s_t, then δ_t in place
        self.G = [xp.empty((T, B, H), dtype=dt) for _ in model.recurrences]
        self.dY = xp.empty((T, B, 2 * H), dtype=dt) if dirs == 2 else None  # ∂E/∂(a layer's output)
        k = truncate or 0
        self.lanes = xp.empty((2, k + 1, B, H), dtype=dt) if truncate is not None else None
        self.dUT = xp.empty((D, model.cell.gates * H), dtype=dt) if batch.tokens else None
        #: time steps per output-layer chunk
        self.chunk = chunk_steps(T, B, model.output_size, chunk_elements)
        # outputs
        self.loss = xp.zeros((), dtype=dt)
        self.grads = {k: xp.empty_like(v) for k, v in model.params.items()}
        self.grads["s0"] = xp.empty((len(model.recurrences), B, H), dtype=dt)
        if model.cell.extra_state:  # ∂E/∂c0 of an LSTM
            self.grads[model.cell.extra_state] = xp.empty((len(model.recurrences), B, H), dtype=dt)

    def describe(self) -> dict[str, Any]:
        """What this workspace serves: T, B, tokens, lengths (bool), truncate, dropout, use_graphs,
        step_kernels, chunk (time steps per output chunk) and captured."""
        T, B, _ = self.G[0].shape
        return {
            "T": T, "B": B, "tokens": self.tokens, "lengths": self.weight is not None, "truncate": self.truncate,
            "dropout": self.dropout, "use_graphs": self.use_graphs, "step_kernels": self.step_kernels,
            "chunk": self.chunk, "captured": self.captured,
        }  # fmt: skip

    @property
    def captured(self) -> bool:
        """Whether runs replay a captured graph (CuPy with ``use_graphs``) rather than computing step by step."""
        return self._captured

    def load(self, batch: Batch, generator: Any = None, offset: int = 0) -> None:
        """Copy the validated inputs into the fixed buffers (device-to-device, no sync); draw dropout masks
        from ``generator`` (the model's, or an int seed for this call) for examples offset, offset + 1, …"""
        self.x[...] = batch.x
        self.y[...] = batch.y
        if self.weight is not None:
            self.weight[...] = batch.weight
        self.stack.load(batch.s0_stacked, batch.lengths, batch.c0_stacked)
        if self.stack.M is not None:
            self.stack.draw_masks(generator, self.dropout, offset)
        if self.tokens:
            plan = self.be.token_plan(batch.x.reshape(-1), self.model.input_size)
            self.perm[...] = plan.perm
            self.offsets[...] = plan.offsets

    def run(self) -> None:
        """Forward + BPTT on the loaded inputs (replaying the captured graph where there is one)."""
        if self.needs_capture:
            self.needs_capture = False
            try:
                self._run = self.be.capture(self._compute)
                self._captured = True
            except Exception as exc:  # this CuPy/driver cannot capture: say so, run uncaptured
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running without graphs",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.model.use_graphs = False
        if self._run is None:
            self._compute()
        else:
            self._run()

    def _compute(self) -> None:
        be, model, p, g, st = self.be, self.model, self.model.params, self.grads, self.stack
        top = st.run(self.x, self.tokens, step_kernels=self.step_kernels)
        dtop = self.G[-1] if model.num_directions == 1 else self.dY
        self.loss[...] = xent_and_grads(
            top, p["V"], p.get("c"), self.y, self.weight,
            be=be, dS=dtop, dV=g["V"], dc=g.get("c"), chunk=self.chunk,
        )  # fmt: skip  # the per-step softmax head: its ∂E/∂(top layer's output) lands in dtop
        plan = TokenPlan(self.perm, self.offsets) if self.tokens else None
        backward_stack(
            model, st, self.G, self.dY, g, self.x, self.tokens, plan, step_kernels=self.step_kernels,
            truncate=self.truncate, lanes=self.lanes, dUT=self.dUT,
        )  # fmt: skip


def check_dpre(cell: Any, dpre: Any, shape: tuple[int, int, int]) -> None:
    """InputError where a cell's ``run_backward`` returned something other than ∂E/∂pre of ``shape`` (T, B, gates·H)."""
    if tuple(getattr(dpre, "shape", ())) != shape:
        got = f"shape {tuple(dpre.shape)}" if hasattr(dpre, "shape") else type(dpre).__name__
        raise InputError(f"cell {cell.option!r}: run_backward returned {got}; expected ∂E/∂pre of shape {shape}")


def _run_backward(out: dict[int, Any], key: int, cell: Any, *args: Any, **kwargs: Any) -> None:
    """``out[key] = cell.run_backward(*args, **kwargs)``: one recurrence's BPTT as a job."""
    out[key] = cell.run_backward(*args, **kwargs)


def backward_stack(
    model: Any,
    st: Stack,
    G: list[Any],
    dY: Any,
    g: dict[str, Any],
    x: Any,
    tokens: bool,
    plan: TokenPlan | None,
    *,
    step_kernels: str,
    truncate: int | None,
    lanes: Any,
    dUT: Any,
    inject: Any = None,
    d_extra: list[dict[int, list[tuple[Any, Any]]]] | None = None,
    dx: Any = None,
) -> None:
    """The stack's pullback: from ∂E/∂(top layer's output) to every recurrent gradient, ds0 (and dc0).

    On entry the top layer's output gradient is in ``G[-1]`` (one direction) or ``dY`` (T, B, 2H)
    (two); ``st`` holds the forward. Writes g's recurrent entries (U, W, b, …, "s0" (L·dirs, B, H), the
    cell's extra state's) in place; the output layer's (V, c) are the head's. ``inject(i, G_i)``, if
    given, adds further direct terms to recurrence i's ∂E/∂s (its own time) before its backward pass
    (the final state's gradient); ``d_extra[i]`` {t: [(cols, values)]} holds direct terms on the cell's
    extra state (an LSTM's c) at the steps named, passed to the cell. ``dx`` (T, B, D): ∂E/∂x for dense x
    (layer 0's input).
    """
    be, cell, H, dirs = model.backend, model.cell, model.hidden_size, model.num_directions
    T, B = st.T, st.B
    for l in range(model.num_layers - 1, -1, -1):
        recs = model.recurrences[l * dirs : (l + 1) * dirs]
        if dirs == 2:  # split ∂E/∂Y_l into the two directions, the reverse one into its own time
            G[2 * l][...] = dY[..., :H]
            st.tmp_h[...] = dY[..., H:]
            gather_rows(st.tmp_h, st.rev, be=be, out=G[2 * l + 1])
        X = x if l == 0 else st.X[l]
        # both directions' BPTT at once where the backend runs jobs concurrently (each on its own work and
        # scratch; truncation shares its lanes, so it runs them in turn), then their input-side gradients in order
        pair = dirs == 2 and truncate is None
        jobs, mines, dpres = [], [], {}
        for r in recs:
            q = model.recurrence_params(r)
            if inject is not None:
                inject(r.index, G[r.index])
            mine = {k: g[r.name(k)] for k in q if r.name(k) in g}  # this recurrence's gradients, by base name
            if cell.extra_state:
                mine[cell.extra_state] = g[cell.extra_state][r.index]
            more = {} if d_extra is None else {"d_extra": d_extra[r.index]}
            work, scratch = (st.tmp, st.scratch_rev) if pair and r.direction == 1 else (st.pre, st.scratch)

            job = functools.partial(
                _run_backward, dpres, r.index, cell, G[r.index], q, st.S[r.index], st.aux[r.index], be=be, work=work,
                scratch=scratch, step_kernels=step_kernels, truncate=truncate, lanes=lanes, grads=mine,
                ds0=g["s0"][r.index], **more,
            )  # fmt: skip
            jobs.append(job)
            mines.append(mine)
        if pair:
            be.run_concurrently(jobs)
        for r, q, mine, job in zip(recs, map(model.recurrence_params, recs), mines, jobs, strict=True):
            if not pair:
                job()
            dpre = dpres[r.index]
            check_dpre(cell, dpre, (T, B, cell.gates * H))
            n_pre = dpre.shape[2]
            if r.direction == 1:  # ∂E/∂pre back into input time
                dpre = gather_rows(dpre, st.rev, be=be, out=st.pre if dpre is not st.pre else st.tmp)
            if cell.input_bias and cell.input_bias in mine:
                be.sum_rows(dpre.reshape(T * B, n_pre), out=mine[cell.input_bias])  # db = Σ_t ∂E/∂pre_t
            input_weight_grad(dpre, X, tokens and l == 0, plan, be=be, out=mine["U"], scratch=dUT)
            below = None
            if l > 0:  # ∂E/∂X_l = Σ_directions ∂E/∂pre @ U, into the layer below's gradient buffer
                below = G[l - 1] if dirs == 1 else dY
            elif dx is not None:  # ∂E/∂x for dense inputs
                below = dx
            if below is not None:
                n_in = below.shape[2]
                be.matmul(dpre.reshape(T * B, n_pre), q["U"], below.reshape(T * B, n_in), accumulate=r.direction == 1)
        if l > 0 and st.M is not None:
            below = G[l - 1] if dirs == 1 else dY
            below *= st.M[l - 1]  # through the dropout of layer l − 1's output
