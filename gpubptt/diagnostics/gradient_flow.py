"""Gradient flow through time: per-step gradient norms, the double sum term by term, truncation bias."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..model import RNN
from ..validation import check_bool
from ._common import (
    ToDict,
    batch_of,
    check_elman,
    check_int,
    check_list,
    check_model,
    direct_terms,
    factors_of,
    json_float,
    json_value,
    plain_copy,
    states_of,
    to_host,
)


# -- 1. per-step gradient -------------------------------------------------------------------------
@dataclass
class StepGradients(ToDict):
    """‖∂E/∂s_t‖ for every step t, each the Frobenius norm over the batch and hidden units (B, H).

    direct (T,)        ‖do_t @ V‖: E_t's own gradient, through the output layer
    through_time (T,)  ‖δ_{t+1} @ W‖: what every later E_{t'} (t' > t) sends back through W (0 at T−1)
    total (T,)         ‖∂E/∂s_t‖ = ‖direct + through_time‖ (the sum of arrays, not of norms)
    s0                 ‖∂E/∂s0‖ = ‖δ_0 @ W‖, the gradient that reaches the initial state
    """

    direct: np.ndarray
    through_time: np.ndarray
    total: np.ndarray
    s0: float


def step_gradients(model: RNN, x: Any, y: Any, s0: Any = None) -> StepGradients:
    """Per-step gradient norms ‖∂E/∂s_t‖, split into the direct and the through-time term.

    x (T, B) token ids or (T, B, D) floats; y (T, B) targets; s0 (B, H) or None. Returns arrays (T,).
    One backward sweep, the recursion of BPTT with the two terms kept apart:

        ∂E/∂s_t = do_t @ V + δ_{t+1} @ W,     δ_t = ∂E/∂s_t ⊙ (1 − s_t²),     δ_T = 0
    """
    model = check_elman(model, "step_gradients")
    batch = batch_of(model, x, y, s0)
    xp, W = model.backend.xp, model.params["W"]
    S = states_of(model, batch)
    T, B, H = batch.T, batch.B, model.hidden_size
    direct = direct_terms(model, batch, S)  # (T, B, H)
    f = factors_of(model, S)  # (T, B, H)
    through = xp.zeros((T, B, H), dtype=model.dtype)  # δ_{t+1} @ W; nothing comes after T−1
    delta = direct[T - 1] * f[T - 1]  # (B, H) δ_{T−1}
    for t in range(T - 2, -1, -1):
        xp.matmul(delta, W, out=through[t])  # the through-time term
        xp.add(direct[t], through[t], out=delta)
        delta *= f[t]  # backprop through tanh
    ds0 = delta @ W  # (B, H)
    total = direct + through
    norms = xp.stack(
        [
            xp.sqrt((direct * direct).sum(axis=(1, 2))),
            xp.sqrt((through * through).sum(axis=(1, 2))),
            xp.sqrt((total * total).sum(axis=(1, 2))),
            xp.broadcast_to(xp.sqrt((ds0 * ds0).sum()), (T,)),
        ]
    )
    host = model.backend.to_numpy(norms).astype(np.float64)  # the one host transfer
    return StepGradients(direct=host[0], through_time=host[1], total=host[2], s0=float(host[3, 0]))


# -- 2. the double sum, term by term --------------------------------------------------------------
@dataclass
class Contributions(ToDict):
    """Norms of the terms of ∂E/∂W = Σ_t Σ_{k≤t} δ_k^{(t)ᵀ} s_{k−1}.

    norms (T, T)   norms[t, k] = ‖Σ_b δ_k^{(t)}[b]ᵀ s_{k−1}[b]‖_F for k ≤ t, 0 above the diagonal:
                   row t is the loss step, column k the step the gradient reaches. With s0 = 0
                   (the default) column 0 is exactly 0, since s_{−1} = s0 multiplies it.
    dW_norm        ‖∂E/∂W‖_F, the norm of the whole sum (not the sum of the norms)
    terms          (T, T, H, H) the terms themselves (only with ``keep_terms=True``), else None
    """

    norms: np.ndarray
    dW_norm: float
    terms: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """norms and dW_norm as plain Python (the terms are left out)."""
        return {"norms": json_value(self.norms), "dW_norm": json_float(self.dW_norm)}


def contributions(model: RNN, x: Any, y: Any, s0: Any = None, *, keep_terms: bool = False) -> Contributions:
    """The T×T matrix of ‖E_t's contribution to ∂E/∂W through step k‖, without dense Jacobians.

    x (T, B) or (T, B, D); y (T, B); s0 (B, H) or None. Returns norms (T, T), lower triangular.

    One backward sweep carries a lane per loss step: lane t holds δ_k^{(t)} (B, H) for the current
    k ≤ t, and all live lanes move one step back together, one ((T−k)·B, H) × (H, H) GEMM per step:

        δ_t^{(t)} = (do_t @ V) ⊙ (1 − s_t²)        δ_{k}^{(t)} = (δ_{k+1}^{(t)} @ W) ⊙ (1 − s_k²)

    ‖δᵀ s‖_F² is read from B×B Gram matrices, ⟨δ δᵀ, s sᵀ⟩, when B ≤ H (O(B²H) per term, no H×H
    matrix), else from the H×H product itself. Work O(T²·B·H²), memory O(T·B·(H + B)).
    ``keep_terms=True`` also returns every H×H term, (T, T, H, H) on the host: for small models.
    """
    model = check_elman(model, "contributions")
    keep_terms = check_bool(keep_terms, "keep_terms")  # (T, T, H, H) on the host: not kept by a mere truthy value
    batch = batch_of(model, x, y, s0)
    be, xp, W = model.backend, model.backend.xp, model.params["W"]
    S = states_of(model, batch)
    T, B, H = batch.T, batch.B, model.hidden_size
    direct = direct_terms(model, batch, S)  # (T, B, H)
    f = factors_of(model, S)  # (T, B, H)
    gram = B <= H
    SS = xp.matmul(S[:-1], S[:-1].transpose(0, 2, 1)) if gram else None  # (T, B, B) Gram of s_{k−1}
    lanes = xp.zeros((T, B, H), dtype=model.dtype)  # lanes[t] = δ_k^{(t)} for t ≥ k
    scratch = xp.empty((T * B, H), dtype=model.dtype)
    sq = xp.zeros((T, T), dtype=model.dtype)  # squared norms
    dW = xp.zeros((H, H), dtype=model.dtype)
    terms = xp.zeros((T, T, H, H), dtype=model.dtype) if keep_terms else None
    for k in range(T - 1, -1, -1):
        n = T - 1 - k  # lanes t = k+1..T−1 are live: one step back through W, then through tanh
        if n:
            live = lanes[k + 1 :].reshape(n * B, H)
            xp.matmul(live, W, out=scratch[: n * B])
            xp.multiply(scratch[: n * B].reshape(n, B, H), f[k], out=lanes[k + 1 :])
        xp.multiply(direct[k], f[k], out=lanes[k])  # E_k's own lane enters
        col = lanes[k:]  # (T−k, B, H)
        s_prev = S[k]  # (B, H) s_{k−1}
        if gram:
            sq[k:, k] = (xp.matmul(col, col.transpose(0, 2, 1)) * SS[k]).sum(axis=(1, 2))
        else:
            M = xp.matmul(col.transpose(0, 2, 1), s_prev)  # (T−k, H, H)
            sq[k:, k] = (M * M).sum(axis=(1, 2))
        dW += col.sum(axis=0).T @ s_prev  # Σ_t δ_k^{(t)ᵀ} s_{k−1} = δ_kᵀ s_{k−1}
        if keep_terms:
            terms[k:, k] = xp.matmul(col.transpose(0, 2, 1), s_prev)  # T²·H² memory: small models only
    norms = xp.sqrt(xp.maximum(sq, 0))  # the Gram form can round a tiny square below 0
    host = be.to_numpy(norms).astype(np.float64)
    dW_norm = float(be.to_numpy(xp.sqrt((dW * dW).sum())))
    return Contributions(norms=host, dW_norm=dW_norm, terms=None if terms is None else to_host(terms))


# -- 4. truncation bias ---------------------------------------------------------------------------
@dataclass
class TruncationBias(ToDict):
    """What tutorial truncation (``truncate=k``) does to the gradient, for each k.

    truncate (n,)      the windows k measured (default 0..T−1; k ≥ T−1 is full BPTT)
    rel_error (n,)     ‖g_full − g_k‖ / ‖g_full‖ over all parameters (U, W, V, and b, c)
    cosine (n,)        ⟨g_full, g_k⟩ / (‖g_full‖ ‖g_k‖)
    by_param           {name: rel_error (n,)} for each parameter and s0 (V and c never change)
    """

    truncate: np.ndarray
    rel_error: np.ndarray
    cosine: np.ndarray
    by_param: dict[str, np.ndarray]


def truncation_bias(model: RNN, x: Any, y: Any, s0: Any = None, *, truncates: Any = None) -> TruncationBias:
    """Relative error and cosine of the truncated gradient against full BPTT, for each window k.

    x (T, B) or (T, B, D); y (T, B); s0 (B, H) or None; truncates: ints ≥ 0 (default 0..T−1).
    Both gradients come from ``loss_and_grads`` of a copy of the model that reads x time-major under the
    per-step softmax head, as the other diagnostics do (the model's ``batch_first`` and ``head`` are not
    used). Returns arrays (len(truncates),).
    """
    model = check_model(model)
    extra = getattr(model.cell, "extra_state", False)  # an LSTM's s0 is the pair (h0, c0), as loss_and_grads takes
    batch = batch_of(model, x, y, None if extra else s0)
    state = s0 if extra else batch.s0
    if extra and s0 is not None:
        model._check(batch.x, batch.y, s0, None, for_loss=True)  # the pair, checked before any work
    truncates = check_list(truncates, "truncates")
    truncates = list(range(batch.T)) if truncates is None else [check_int(k, "truncate", 0) for k in truncates]
    model = plain_copy(model)  # time-major, the softmax head: as states_of and direct_terms read the batch
    be, xp = model.backend, model.backend.xp
    _, full = model.loss_and_grads(batch.x, batch.y, state)
    names = [*model.params, "s0", *([extra] if extra else [])]
    rows = []  # per k: for each name, ‖g_full − g_k‖², ⟨g_full, g_k⟩, ‖g_k‖²  (stays on the device)
    for k in truncates:
        _, g = model.loss_and_grads(batch.x, batch.y, state, truncate=k)
        parts = []
        for name in names:
            d = full[name] - g[name]
            parts += [(d * d).sum(), (full[name] * g[name]).sum(), (g[name] * g[name]).sum()]
        rows.append(xp.stack(parts))
    full_sq = xp.stack([(full[name] * full[name]).sum() for name in names])
    if rows:
        host = be.to_numpy(xp.stack(rows)).astype(np.float64).reshape(len(truncates), len(names), 3)
    else:
        host = np.zeros((0, len(names), 3))
    fsq = be.to_numpy(full_sq).astype(np.float64)
    p = slice(0, len(model.params))  # the parameters, without s0 (and c0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(host[:, p, 0].sum(axis=1) / fsq[p].sum())
        cos = host[:, p, 1].sum(axis=1) / np.sqrt(fsq[p].sum() * host[:, p, 2].sum(axis=1))
        by_param = {name: np.sqrt(host[:, i, 0] / fsq[i]) for i, name in enumerate(names)}
    return TruncationBias(truncate=np.asarray(truncates), rel_error=rel, cosine=cos, by_param=by_param)
