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

import warnings
from typing import Any

from ._checks import Batch
from .backend import Backend, TokenPlan
from .losses import chunk_steps, xent_and_grads

__all__ = ["Workspace", "backward_truncated", "input_projection", "input_weight_grad", "states"]


def input_projection(U: Any, b: Any, x: Any, tokens: bool, *, be: Backend, out: Any) -> Any:
    """U x_t (+ b) for all steps at once into ``out`` (T, B, H).

    Tokens x (T, B): a column gather of U (the one-hot product, never a dense one-hot matrix).
    Dense x (T, B, D): one GEMM (T·B, D) × (D, H).
    """
    xp = be.xp
    T, B, H = out.shape
    if tokens:
        xp.take(U.T, x.reshape(-1), axis=0, out=out.reshape(T * B, H))
    else:
        be.matmul(x.reshape(T * B, -1), U.T, out.reshape(T * B, H))
    if b is not None:
        out += b
    return out


def backward_truncated(cell: Any, G: Any, W: Any, F: Any, k: int, *, be: Backend, lanes: Any, spare: Any) -> None:
    """Tutorial-truncated BPTT with window k ≥ 0, in place on G (as the cell's ``backward``).

    G (T, B, H) enters as ∂E_t/∂s_t, leaves as δ_t; F (T, B, H) the cell's ``factors``; lanes,
    spare (k+1, B, H) scratch. Lane d of step j holds the contribution of E_{j+d}; it moves to lane
    d+1 of step j−1 through the cell's ``step_back`` (one GEMM for all lanes), and lane k falls off.
    """
    xp = be.xp
    cur, nxt = lanes, spare
    cur[...] = 0
    for t in range(G.shape[0] - 1, -1, -1):
        if k > 0:
            cell.step_back(cur[:k], W, F[t], nxt[1:], be=be)  # every live lane one step back
        cell.enter(G[t], F[t], nxt[0], be=be)  # E_t's own contribution enters lane 0
        xp.sum(nxt, axis=0, out=G[t])
        cur, nxt = nxt, cur


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


def states(model: Any, batch: Batch, *, step_kernels: str = "auto") -> Any:
    """The model's forward recurrence on a validated batch: S (T+1, B, H) with S[0] = s0 (fresh arrays)."""
    be, xp, p = model.backend, model.backend.xp, model.params
    T, B, H = batch.T, batch.B, model.hidden_size
    S = xp.empty((T + 1, B, H), dtype=model.dtype)  # S[t+1] = s_t
    S[0] = 0 if batch.s0 is None else batch.s0
    pre = xp.empty((T, B, H), dtype=model.dtype)
    input_projection(p["U"], p.get("b"), batch.x, batch.tokens, be=be, out=pre)
    scratch = xp.empty((B, H), dtype=model.dtype)
    model.cell.forward(pre, p["W"], S, be=be, scratch=scratch, step_kernels=step_kernels)
    return S


class Workspace:
    """Every buffer one forward+BPTT needs for one shape, allocated once and reused.

    Inputs are copied into fixed buffers, so the same computation (or its captured CUDA graph)
    runs on every call; outputs land in ``loss`` (0-d) and ``grads`` (shaped like the params,
    plus "s0" (B, H)). ``model`` supplies the cell, the parameters, the dtype and ``use_graphs``;
    ``step_kernels`` picks the cell's kernels, ``chunk_elements`` sizes the output-layer chunks.
    """

    def __init__(
        self, model: Any, batch: Batch, truncate: int | None, *, step_kernels: str, chunk_elements: int
    ) -> None:
        be, xp, dt = model.backend, model.backend.xp, model.dtype
        T, B, D, H = batch.T, batch.B, model.input_size, model.hidden_size
        self.model, self.be, self.truncate, self.tokens = model, be, truncate, batch.tokens
        self.step_kernels = step_kernels
        self.use_graphs = model.use_graphs
        self.needs_capture = bool(model.use_graphs and be.supports_graphs)
        self._run = self._compute
        self._captured = False
        # inputs
        self.x = xp.empty((T, B), dtype=xp.int64) if batch.tokens else xp.empty((T, B, D), dtype=dt)
        self.y = xp.empty((T, B), dtype=xp.int64)
        self.weight = None if batch.weight is None else xp.empty((T, B), dtype=dt)
        self.perm = xp.empty(T * B, dtype=xp.int64) if batch.tokens else None
        self.offsets = xp.empty(D + 1, dtype=xp.int64) if batch.tokens else None
        # work
        self.S = xp.zeros((T + 1, B, H), dtype=dt)  # S[0] = s0, S[t+1] = s_t
        self.pre = xp.empty((T, B, H), dtype=dt)
        self.G = xp.empty((T, B, H), dtype=dt)  # direct term ∂E_t/∂s_t, then δ_t in place
        self.row = xp.empty((B, H), dtype=dt)  # per-step scratch
        k = truncate or 0
        self.lanes = xp.empty((2, k + 1, B, H), dtype=dt) if truncate is not None else None
        self.dUT = xp.empty((D, H), dtype=dt) if batch.tokens else None
        #: time steps per output-layer chunk
        self.chunk = chunk_steps(T, B, model.output_size, chunk_elements)
        # outputs
        self.loss = xp.zeros((), dtype=dt)
        self.grads = {k: xp.empty_like(v) for k, v in model.params.items()}
        self.grads["s0"] = xp.empty((B, H), dtype=dt)

    def describe(self) -> dict[str, Any]:
        """What this workspace serves: T, B, tokens, lengths (bool), truncate, use_graphs, step_kernels,
        chunk (time steps per output chunk) and captured."""
        T, B, _ = self.G.shape
        return {
            "T": T, "B": B, "tokens": self.tokens, "lengths": self.weight is not None, "truncate": self.truncate,
            "use_graphs": self.use_graphs, "step_kernels": self.step_kernels, "chunk": self.chunk,
            "captured": self.captured,
        }  # fmt: skip

    @property
    def captured(self) -> bool:
        """Whether runs replay a captured graph (CuPy with ``use_graphs``) rather than computing step by step."""
        return self._captured

    def load(self, batch: Batch) -> None:
        """Copy the validated inputs into the fixed buffers (device-to-device, no sync)."""
        self.x[...] = batch.x
        self.y[...] = batch.y
        if self.weight is not None:
            self.weight[...] = batch.weight
        self.S[0] = 0 if batch.s0 is None else batch.s0
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
                self._run = self._compute
        self._run()

    def _compute(self) -> None:
        be, cell, p, g = self.be, self.model.cell, self.model.params, self.grads
        T, B, H = self.G.shape
        input_projection(p["U"], p.get("b"), self.x, self.tokens, be=be, out=self.pre)
        cell.forward(self.pre, p["W"], self.S, be=be, scratch=self.row, step_kernels=self.step_kernels)
        self.loss[...] = xent_and_grads(
            self.S[1:], p["V"], p.get("c"), self.y, self.weight,
            be=be, dS=self.G, dV=g["V"], dc=g.get("c"), chunk=self.chunk,
        )  # fmt: skip
        F = cell.factors(self.S, be=be, out=self.pre)  # pre is spent: reuse it for the step factors
        if self.truncate is None:
            cell.backward(self.G, p["W"], F, be=be, carry=self.row, step_kernels=self.step_kernels)
        else:
            lanes, spare = self.lanes
            backward_truncated(cell, self.G, p["W"], F, self.truncate, be=be, lanes=lanes, spare=spare)
        delta = self.G.reshape(T * B, H)
        be.matmul(delta.T, self.S[:-1].reshape(T * B, H), g["W"])  # dW = Σ_t δ_tᵀ s_{t-1}
        plan = TokenPlan(self.perm, self.offsets) if self.tokens else None
        input_weight_grad(self.G, self.x, self.tokens, plan, be=be, out=g["U"], scratch=self.dUT)
        if "b" in g:
            be.xp.sum(delta, axis=0, out=g["b"])  # db = Σ_t δ_t
        be.matmul(self.G[0], p["W"], g["s0"])  # ds0 = δ_0 @ W
