"""The forward recurrence and the backward recursion of BPTT, batched and time-major.

The math, verbatim (rows are examples; S[0] = s0 and S[t+1] = s_t, so S has T+1 steps):

    forward:   s_t = tanh(x_t @ U.T + b + s_{t-1} @ W.T)
    backward:  δ_t = (do_t @ V + δ_{t+1} @ W) ⊙ (1 − s_t²),     δ_T = 0
               dW = Σ_t δ_tᵀ s_{t-1}    dU = Σ_t δ_tᵀ x_t    db = Σ_t δ_t    ds0 = δ_0 @ W

Only ``s_{t-1} @ W.T`` and ``δ_{t+1} @ W`` are sequential; everything else is one GEMM (or one
gather / scatter-add for token inputs) over all T·B rows. The two loops run over preallocated
buffers with ``out=``: nothing is allocated per step.

Truncation (``truncate=k``) is the classic tutorial scheme: the gradient of E_t flows back through
steps t, t−1, …, t−k only. Step j then receives the contributions of E_j … E_{j+k}; each is carried
in its own "lane" (lane d holds E_{j+d}'s contribution), all lanes advance with one GEMM per step.
"""

from __future__ import annotations

from typing import Any

from .backend import Backend, TokenPlan

__all__ = [
    "backward_full",
    "backward_truncated",
    "input_projection",
    "input_weight_grad",
    "recurrence_forward",
    "tanh_derivative",
]


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


def recurrence_forward(pre: Any, W: Any, S: Any, *, be: Backend, hw: Any) -> None:
    """Run s_t = tanh(pre_t + s_{t-1} @ W.T) for t = 0..T-1, in place.

    pre (T, B, H); S (T+1, B, H) with S[0] = s0 on entry, S[1:] written; hw (B, H) scratch.
    """
    if pre.shape[0] == 0 or be.forward_recurrence(pre, W, S):  # all steps in one kernel (CuPy)
        return
    for t in range(pre.shape[0]):
        be.forward_step(S[t], W, pre[t], S[t + 1], hw)  # s_t = tanh(pre_t + s_{t-1} @ W.T)


def tanh_derivative(S: Any, *, be: Backend, out: Any) -> Any:
    """∂s_t/∂(pre-activation) = 1 − s_t² for every step at once: S (T+1, B, H) → out (T, B, H)."""
    xp = be.xp
    xp.multiply(S[1:], S[1:], out=out)
    xp.subtract(1, out, out=out)
    return out


def backward_full(G: Any, W: Any, Dt: Any, *, be: Backend, carry: Any) -> None:
    """Full BPTT, in place: G (T, B, H) enters as the direct term ∂E_t/∂s_t, leaves as δ_t.

    Dt (T, B, H) is 1 − s_t² (``tanh_derivative``); carry (B, H) scratch.
    """
    T = G.shape[0]
    if T == 0:
        return
    G[T - 1] *= Dt[T - 1]  # δ_{T-1}: no later step feeds back
    if T == 1 or be.backward_recurrence(G, W, Dt):  # all steps in one kernel that keeps W on chip (CuPy)
        return
    for t in range(T - 2, -1, -1):
        be.backward_step(G[t + 1], W, Dt[t], G[t], carry)  # δ_t = (g_t + δ_{t+1} @ W) ⊙ (1 − s_t²)


def backward_truncated(G: Any, W: Any, Dt: Any, k: int, *, be: Backend, lanes: Any, spare: Any) -> None:
    """Tutorial-truncated BPTT with window k ≥ 0, in place on G (as ``backward_full``).

    Dt (T, B, H) is 1 − s_t²; lanes, spare (k+1, B, H) scratch. Lane d of step j holds the
    contribution of E_{j+d}; it moves to lane d+1 of step j−1 through one GEMM, and lane k falls off.
    """
    xp = be.xp
    T, B, H = G.shape
    cur, nxt = lanes, spare
    cur[...] = 0
    for t in range(T - 1, -1, -1):
        dt = Dt[t]  # 1 − s_t²
        if k > 0:
            # every live lane goes one step back through W at once: one (k·B, H) × (H, H) GEMM
            be.matmul(cur[:k].reshape(k * B, H), W, nxt[1:].reshape(k * B, H))
            nxt[1:] *= dt
        xp.multiply(G[t], dt, out=nxt[0])  # E_t's own contribution enters lane 0
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
