"""Softmax output layer and cross-entropy over time, in chunks of time steps.

The output layer is the widest part of the model (K can be thousands), so it never materialises
(T, B, K): it runs over blocks of ``chunk·B`` rows, each one GEMM for the logits, a stable
log-sum-exp, and (for the gradient) one GEMM each for ∂E/∂s and dV. Memory stays O(chunk·B·K).

    z_t = s_t @ V.T + c                 (rows of the chunk)
    E_t = logsumexp(z_t) − z_t[y_t]     stable: shift by the row max first
    do_t = softmax(z_t) − onehot(y_t)   ∂E/∂z_t; zeroed on padded steps
    ∂E/∂s_t (direct term) = do_t @ V,   dV += do_tᵀ s_t,   dc += Σ do_t
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ..backend import Backend

__all__ = ["chunk_steps", "softmax_probs", "xent_and_grads", "xent_loss"]


def chunk_steps(T: int, B: int, K: int, budget: int) -> int:
    """Time steps per output-layer chunk so that chunk·B·K ≤ budget (at least 1, at most T).

    The budget is the model's ``chunk_elements`` (the backend's default where no chunk is given).
    """
    return max(1, min(T, budget // max(1, B * K)))


def _logits(rows: Any, V: Any, c: Any, out: Any, *, be: Backend) -> Any:
    """z = rows @ V.T (+ c) into ``out``; rows (n, H), V (K, H) → (n, K)."""
    be.matmul(rows, V.T, out)
    if c is not None:
        out += c
    return out


def _exp_and_row_loss(z: Any, tgt: Any, *, xp: Any) -> tuple[Any, Any, Any]:
    """Stable log-softmax cross-entropy of each row, in place: z (n, K) ← exp(z − row max).

    Returns (E (n,) = log Σ exp(z − m) − (z[y] − m), the row sums of exp (n,), arange(n)).
    """
    z -= z.max(axis=1, keepdims=True)
    ar = xp.arange(z.shape[0])
    z_y = z[ar, tgt]  # (n,)
    xp.exp(z, out=z)
    total = z.sum(axis=1)  # (n,)
    return xp.log(total) - z_y, total, ar


def _rows_xent_grad(z: Any, tgt: Any, w: Any, out: Any, i: int, *, xp: Any) -> None:
    """Rows of a chunk, in place: z (n, K) logits ← do = (softmax(z) − onehot(y)) (⊙ w); out[i] ← Σ of the rows'
    (weighted) losses, a 0-d array. One of ``xent_and_grads``' row blocks (``Backend.row_blocks``)."""
    e, total, ar = _exp_and_row_loss(z, tgt, xp=xp)  # z ← exp(z − max); e (n,) per-step loss
    # backprop through softmax + cross-entropy: do = softmax(z) − onehot(y)
    z *= (1 / total)[:, None]  # one reciprocal per row, then a multiply: cheaper than a divide
    z[ar, tgt] -= 1
    if w is not None:
        e *= w
        z *= w[:, None]
    out[i] = e.sum()


def _rows_loss(z: Any, tgt: Any, w: Any, out: Any, i: int, *, xp: Any) -> None:
    """Rows of a chunk: out[i] ← Σ of the rows' (weighted) losses (z clobbered). A row block of ``xent_loss``."""
    e, _, _ = _exp_and_row_loss(z, tgt, xp=xp)
    if w is not None:
        e *= w
    out[i] = e.sum()


def _by_row_blocks(fn: Any, z: Any, tgt: Any, w: Any, *, be: Backend) -> Any:
    """``fn`` over the row blocks of z (n, K) (``Backend.row_blocks``: two at once on a CPU with two cores free,
    else one), each on its rows of z, tgt (n,) and w (n,) or None; the sum of their losses."""
    blocks = be.row_blocks(z.shape[0], z.size)
    sums: list[Any] = [None] * len(blocks)
    be.run_concurrently(  # one block runs right here
        [partial(fn, z[b], tgt[b], None if w is None else w[b], sums, i, xp=be.xp) for i, b in enumerate(blocks)]
    )
    return sum(sums[1:], sums[0])


def softmax_probs(states: Any, V: Any, c: Any, *, be: Backend, chunk: int | None = None) -> Any:
    """Softmax probabilities for every step: states (T, B, H) → probs (T, B, K)."""
    xp = be.xp
    T, B, H = states.shape
    K = V.shape[0]
    probs = xp.empty((T, B, K), dtype=states.dtype)
    step = chunk or chunk_steps(T, B, K, be.chunk_elements)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        z = probs[t0:t1].reshape(-1, K)  # (n, K) view
        _logits(states[t0:t1].reshape(-1, H), V, c, z, be=be)
        z -= z.max(axis=1, keepdims=True)
        xp.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
    return probs


def xent_and_grads(
    states: Any,
    V: Any,
    c: Any,
    y: Any,
    weight: Any,
    *,
    be: Backend,
    dS: Any,
    dV: Any,
    dc: Any,
    chunk: int | None = None,
    accumulate: bool = False,
) -> Any:
    """Cross-entropy summed over counted steps; writes its gradients.

    states (T, B, H) are s_0..s_{T-1}; y (T, B) int targets (valid everywhere: padded entries
    already replaced); weight (T, B) with 1 on counted steps, 0 on padded ones, or None.
    Writes dS (T, B, H) = the direct term do_t @ V, and dV (K, H), dc (K,) or None, overwriting
    (``accumulate``: adding to dV and dc, as recomputation does over segments).
    Returns the loss as a 0-d array on the backend (no host sync).
    """
    xp = be.xp
    T, B, H = states.shape
    K = V.shape[0]
    step = chunk or chunk_steps(T, B, K, be.chunk_elements)
    zbuf = xp.empty((step * B, K), dtype=states.dtype)
    loss = xp.zeros((), dtype=states.dtype)
    if dc is not None and not accumulate:
        dc[...] = 0
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        n = (t1 - t0) * B
        rows = states[t0:t1].reshape(n, H)  # (n, H)
        tgt = y[t0:t1].reshape(n)  # (n,)
        z = _logits(rows, V, c, zbuf[:n], be=be)  # (n, K)
        w = None if weight is None else weight[t0:t1].reshape(n)
        loss += _by_row_blocks(_rows_xent_grad, z, tgt, w, be=be)  # z ← do_t, by blocks of rows
        be.matmul(z, V, dS[t0:t1].reshape(n, H))  # direct term ∂E/∂s_t = do_t @ V
        be.matmul(z.T, rows, dV, accumulate=accumulate or t0 > 0)  # dV += do_tᵀ s_t
        if dc is not None:
            dc += be.sum_rows(z)
    return loss


def xent_loss(states: Any, V: Any, c: Any, y: Any, weight: Any, *, be: Backend, chunk: int | None = None) -> Any:
    """Loss only (no gradients): same arguments and result as ``xent_and_grads``."""
    xp = be.xp
    T, B, H = states.shape
    K = V.shape[0]
    step = chunk or chunk_steps(T, B, K, be.chunk_elements)
    zbuf = xp.empty((step * B, K), dtype=states.dtype)
    loss = xp.zeros((), dtype=states.dtype)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        n = (t1 - t0) * B
        z = _logits(states[t0:t1].reshape(n, H), V, c, zbuf[:n], be=be)
        w = None if weight is None else weight[t0:t1].reshape(n)
        loss += _by_row_blocks(_rows_loss, z, y[t0:t1].reshape(n), w, be=be)
    return loss
