"""Why gradients vanish: exact gradient-flow diagnostics of a model on a batch.

The BPTT gradient of the recurrent weights is a double sum (ARCHITECTURE.md), one term per pair of
a loss step t and an earlier step k:

    ∂E/∂W = Σ_t Σ_{k≤t} δ_k^{(t)ᵀ} s_{k−1}          (rows are examples; summed over the batch)
    δ_k^{(t)} = E_t's gradient at the pre-activation of step k
              = (∂E_t/∂s_t · Π_{j=k+1..t} ∂s_j/∂s_{j−1}) ⊙ (1 − s_k²)
    ∂s_j/∂s_{j−1} = diag(1 − s_j²) W                 ← the product that vanishes or explodes

This module measures every piece of that argument on a model and a batch:

    step_gradients      ‖∂E/∂s_t‖ per step t, split into the direct term (E_t through V) and the
                        through-time term (later steps through W)
    contributions       the T×T lower-triangular matrix ‖E_t's contribution to ∂E/∂W through step k‖
    jacobian_products   ‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ against the lag t − k (power iteration), the
                        spectral radius and norm of W, the saturated fraction, the gradient horizon
                        and the fitted geometric rate; ``product_norms`` is the same on raw factors
    truncation_bias     what tutorial truncation costs: relative error and cosine against full BPTT
    vanish_report       all four; ``vanish_sweep`` repeats it with W rescaled to chosen spectral radii
    random_problem      a random model on random tokens: what ``gpubptt vanish`` measures by default
    checkpoint_problem  a trained model from a checkpoint, on windows of a text or on its task's sequences
    plot_vanish         one PNG of a sweep (matplotlib, the optional ``plot`` extra)

States come from ``model.forward`` and full or truncated gradients from ``model.loss_and_grads``;
only the per-term sweeps are written here, once, against ``xp = model.backend.xp``. Results are
host-side dataclasses of float64 NumPy arrays (one transfer at the end of each function, never
inside a per-step loop), each with ``to_dict()`` for JSON. Sequences are full length (no
``lengths``) and E is the sum over steps and examples.

    >>> import numpy as np, gpubptt
    >>> from gpubptt import diagnostics
    >>> model = gpubptt.RNN(8, 16, 8, backend="numpy", dtype="float64", seed=0)
    >>> x = np.random.default_rng(0).integers(0, 8, size=(12, 4))      # (T, B) token ids
    >>> jp = diagnostics.jacobian_products(model, x)
    >>> jp.norms.shape, bool(jp.decay_rate < 1)                       # lags 0..T−1
    ((12,), True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._checks import Batch, check_batch
from .backend import get_backend, to_numpy
from .checkpoint import CheckpointError, load_checkpoint
from .data import Vocab, make_data, read_text
from .errors import InputError, InputTypeError
from .losses import softmax_probs
from .memory import check_fits, vanish_memory
from .model import RNN

#: |log slope| below this is round-off around a flat line (an orthogonal W gives ±1e-16): no horizon.
NO_DECAY_SLOPE = 1e-9

__all__ = [
    "ACTIVATIONS",
    "VANISH_STAGES",
    "Contributions",
    "JacobianProducts",
    "ProductNorms",
    "StepGradients",
    "TruncationBias",
    "VanishProblem",
    "VanishReport",
    "checkpoint_problem",
    "contributions",
    "jacobian_products",
    "plot_vanish",
    "product_norms",
    "random_problem",
    "require_matplotlib",
    "spectral_radius",
    "step_gradients",
    "text_windows",
    "truncation_bias",
    "vanish_report",
    "vanish_sweep",
    "with_spectral_radius",
]

ACTIVATIONS = ("tanh", "linear")
PLOT_HINT = "install it with `pip install 'gpubptt[plot]'` (or `pip install matplotlib`)"


# -- JSON helpers ---------------------------------------------------------------------------------
def _json_value(v: Any) -> Any:
    """NumPy arrays and scalars as lists and floats; NaN and ±inf as None (strict JSON)."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "f":
            return [_json_value(a) for a in v] if v.ndim > 1 else [_json_float(a) for a in v]
        return v.tolist()
    if isinstance(v, (float, np.floating)):
        return _json_float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, dict):
        return {k: _json_value(a) for k, a in v.items()}
    return v


def _json_float(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python (lists, floats, None for non-finite values), for JSON."""
        out = {}
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            v = getattr(self, name)
            out[name] = v.to_dict() if isinstance(v, _ToDict) else _json_value(v)
        return out


# -- validation -----------------------------------------------------------------------------------
def _check_model(model: Any) -> RNN:
    if not isinstance(model, RNN):
        raise InputTypeError(f"model must be a gpubptt.RNN, got {type(model).__name__}")
    return model


def _check_positive_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be a positive number, got {type(v).__name__} {v!r}")
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name} must be a finite number > 0, got {v}")
    return float(v)


def _check_int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputTypeError(f"{name} must be an int ≥ {lo}, got {type(v).__name__} {v!r}")
    if v < lo:
        raise InputError(f"{name} must be an int ≥ {lo}, got {v}")
    return int(v)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"tol must be a number ≥ 0, got {type(tol).__name__} {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise InputError(f"tol must be a finite number ≥ 0, got {tol}")
    return float(tol)


def _batch(model: RNN, x: Any, y: Any, s0: Any) -> Batch:
    """Validate x (and y, s0) against the model before any work; T ≥ 1 and B ≥ 1."""
    return check_batch(
        model.backend,
        model.dtype,
        model.input_size,
        model.hidden_size,
        model.output_size,
        x,
        y,
        s0,
        None,
        for_loss=True,
    )


def _states(model: RNN, batch: Batch) -> Any:
    """The model's own forward recurrence: S (T+1, B, H) with S[0] = s0 (s_{−1}) and S[t+1] = s_t."""
    return model.states(batch.x, batch.s0)  # validated already: the check is cheap


def _direct_terms(model: RNN, batch: Batch, S: Any) -> Any:
    """The direct term ∂E_t/∂s_t = do_t @ V for every t, with do_t = ŷ_t − onehot(y_t): (T, B, H)."""
    xp = model.backend.xp
    probs = softmax_probs(S[1:], model.params["V"], model.params.get("c"), be=model.backend)  # (T, B, K)
    T, B, K = probs.shape
    do = probs.reshape(T * B, K).copy()  # (T·B, K)
    do[xp.arange(T * B), batch.y.reshape(-1)] -= 1  # backprop through softmax + cross-entropy
    return (do @ model.params["V"]).reshape(T, B, -1)


def _factors(model: RNN, S: Any) -> Any:
    """The cell's step factors f_t (tanh: 1 − s_t²) for t = 0..T−1, (T, B, H): ∂s_t/∂s_{t−1} = diag(f_t) W."""
    return model.cell.factors(S, be=model.backend, out=model.backend.xp.empty_like(S[1:]))


# -- 1. per-step gradient -------------------------------------------------------------------------
@dataclass
class StepGradients(_ToDict):
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
    One backward sweep, the recursion of ARCHITECTURE.md with the two terms kept apart:

        ∂E/∂s_t = do_t @ V + δ_{t+1} @ W,     δ_t = ∂E/∂s_t ⊙ (1 − s_t²),     δ_T = 0
    """
    model = _check_model(model)
    batch = _batch(model, x, y, s0)
    xp, W = model.backend.xp, model.params["W"]
    S = _states(model, batch)
    T, B, H = batch.T, batch.B, model.hidden_size
    direct = _direct_terms(model, batch, S)  # (T, B, H)
    f = _factors(model, S)  # (T, B, H)
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
class Contributions(_ToDict):
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
        return {"norms": _json_value(self.norms), "dW_norm": _json_float(self.dW_norm)}


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
    model = _check_model(model)
    batch = _batch(model, x, y, s0)
    be, xp, W = model.backend, model.backend.xp, model.params["W"]
    S = _states(model, batch)
    T, B, H = batch.T, batch.B, model.hidden_size
    direct = _direct_terms(model, batch, S)  # (T, B, H)
    f = _factors(model, S)  # (T, B, H)
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
    return Contributions(norms=host, dW_norm=dW_norm, terms=None if terms is None else _to_host(terms))


# -- 3. Jacobian products against the lag ---------------------------------------------------------
@dataclass
class ProductNorms(_ToDict):
    """log ‖diag(f_n) W · diag(f_{n−1}) W ⋯ diag(f_{n−ℓ+1}) W‖₂ for ℓ = 0..n, per example.

    log_norms (n+1, B)  row ℓ: the natural log of the largest singular value of the ℓ-step product
                        for each example (row 0: the identity, log 1 = 0)
    iterations          power iterations run; converged: whether every lag met the tolerance
    """

    log_norms: np.ndarray
    iterations: int
    converged: bool


def product_norms(W: Any, factors: Any, *, xp: Any, iters: int = 300, tol: float = 1e-5, seed: int = 0) -> ProductNorms:
    """Spectral norms of the products of the last ℓ step Jacobians diag(f_j) W, for every ℓ at once.

    W (H, H); factors (n, B, H): f_1..f_n, the diagonal of step j's Jacobian for each example
    (1 − s_j² for tanh; all ones for a linear recurrence, whose Jacobians are W itself).
    Returns log norms (n+1, B) for lags ℓ = 0..n, the product P_ℓ = J_n J_{n−1} ⋯ J_{n−ℓ+1}.

    Power iteration on P_ℓᵀ P_ℓ for every lag and example together, from Jacobian–vector and
    vector–Jacobian products only (no dense Jacobian): a lane per lag, and all live lanes advance
    with one (ℓ·B, H) × (H, H) GEMM per step. Every step renormalises the vectors and keeps the
    log of the scale, so products far below or above the float range still come out right. A lag
    whose log norm moved by at most ``tol`` (≈ relative change) in one iteration, for every
    example, is done; once every longer lag is done too its lane is frozen and drops out of the
    sweeps (long products have well-separated singular values and converge first). One host sync
    per iteration, none per step.
    """
    iters = _check_int(iters, "iters", 1)
    tol = _check_tol(tol)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or factors.ndim != 3 or factors.shape[2] != W.shape[0]:
        raise InputError(
            f"expected W (H, H) and factors (n, B, H); got W {tuple(W.shape)}, factors {tuple(factors.shape)}"
        )
    n, B, H = factors.shape
    log_norms = xp.zeros((n + 1, B), dtype=factors.dtype)
    if n == 0:
        return ProductNorms(log_norms=np.zeros((1, B)), iterations=0, converged=True)
    tiny = float(np.finfo(np.dtype(factors.dtype)).tiny)
    rng = np.random.default_rng(seed)
    v = xp.asarray(rng.standard_normal((n, B, H)), dtype=factors.dtype)  # lane i is lag ℓ = i+1
    v /= xp.sqrt((v * v).sum(axis=2, keepdims=True))
    u = xp.empty_like(v)
    scratch = xp.empty((n * B, H), dtype=factors.dtype)
    WT = W.T
    logs = xp.zeros((n, B), dtype=factors.dtype)  # log ‖P_ℓ v‖ of the latest iteration, lane i = lag i+1
    hi, iterations = n, 0  # lanes i ≥ hi have converged and are frozen (long lags converge first)

    def renormalise(a: Any) -> Any:
        r = xp.maximum(xp.sqrt((a * a).sum(axis=2, keepdims=True)), tiny)  # a zero vector stays finite
        a /= r
        return r[..., 0]

    for it in range(1, iters + 1):
        iterations = it
        prev = logs[:hi].copy()
        logs[:hi] = 0
        u[:hi] = v[:hi]
        # Jacobian–vector products u = P_ℓ v: lag ℓ starts at step n−ℓ+1; at step j lanes i ≥ n−j are live
        for j in range(max(1, n - hi + 1), n + 1):
            lo, m = n - j, hi - (n - j)
            a = u[lo:hi]  # (m, B, H)
            xp.matmul(a.reshape(m * B, H), WT, out=scratch[: m * B])  # W v
            xp.multiply(scratch[: m * B].reshape(m, B, H), factors[j - 1], out=a)  # diag(f_j)
            logs[lo:hi] += xp.log(renormalise(a))
        # vector–Jacobian products v = P_ℓᵀ u: back from step n; lag ℓ stops after step n−ℓ+1
        for j in range(n, max(1, n - hi + 1) - 1, -1):
            lo, m = n - j, hi - (n - j)
            a = u[lo:hi]
            a *= factors[j - 1]  # diag(f_j)
            xp.matmul(a.reshape(m * B, H), W, out=scratch[: m * B])  # (…) W
            a[...] = scratch[: m * B].reshape(m, B, H)
            renormalise(a)
        u, v = v, u
        if it == 1:
            continue
        moved = to_numpy(xp.abs(logs[:hi] - prev).max(axis=1))  # (hi,) one sync per iteration
        while hi > 0 and moved[hi - 1] <= tol:
            hi -= 1
        if hi == 0:
            break
    log_norms[1:] = logs
    return ProductNorms(log_norms=_to_host(log_norms), iterations=iterations, converged=hi == 0)


def _to_host(a: Any) -> np.ndarray:
    return to_numpy(a).astype(np.float64)


@dataclass
class JacobianProducts(_ToDict):
    """‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ against the lag ℓ = t − k, with the end step t fixed.

    lags (n+1,)                 0..n with n = end (k runs from end down to 0)
    norms (n+1,)                the geometric mean over the batch, exp(mean_b log ‖P_b‖₂), of the
                                per-example spectral norms (each example has its own s_j)
    norms_per_example (n+1, B)  the per-example spectral norms (B = 1 with ``example=b``)
    example                     the one example measured, or None for the whole batch
    end                         the step t where every product ends (default T−1, the last)
    activation                  "tanh": ∂s_j/∂s_{j−1} = diag(1 − s_j²) W; "linear": W alone
    spectral_radius, spectral_norm   max |eig(W)| and ‖W‖₂
    saturated_fraction          the fraction of all states (T, B, H) with |s| > ``saturation``
                                (of that example's states (T, H) with ``example=b``)
    threshold, horizon          the first lag whose norm is below threshold (None: none is, within n)
    log_slope, decay_rate       least-squares line log norm ≈ log_intercept + log_slope · ℓ over
                                ℓ = 1..n, and exp(slope): the fitted factor per step (< 1 vanishes,
                                > 1 explodes; None with fewer than two lags)
    horizon_fit                 the lag where that line crosses log threshold, (log threshold −
                                log_intercept) / log_slope: an extrapolated horizon when the
                                sequence is too short to reach it (None unless the slope is below
                                −1e-9: a flatter line is round-off around no decay, e.g. W = Q)
    iterations, converged       of the power iteration
    """

    lags: np.ndarray
    norms: np.ndarray
    norms_per_example: np.ndarray
    end: int
    example: int | None
    activation: str
    spectral_radius: float
    spectral_norm: float
    saturated_fraction: float
    saturation: float
    threshold: float
    horizon: int | None
    log_slope: float | None
    log_intercept: float | None
    decay_rate: float | None
    horizon_fit: float | None
    iterations: int
    converged: bool


def spectral_radius(W: Any) -> float:
    """max |eig(W)| of a square matrix W (H, H) on any backend (computed on the host in float64)."""
    Wh = to_numpy(W).astype(np.float64)
    return float(np.abs(np.linalg.eigvals(Wh)).max()) if Wh.size else 0.0


def _fit(log_norms: np.ndarray) -> tuple[float | None, float | None]:
    """Least-squares (slope, intercept) of log norm against the lag over lags 1..n (finite values only)."""
    lags = np.arange(len(log_norms))
    keep = (lags >= 1) & np.isfinite(log_norms)
    if keep.sum() < 2:
        return None, None
    slope, intercept = np.polyfit(lags[keep], log_norms[keep], 1)
    return float(slope), float(intercept)


def jacobian_products(
    model: RNN,
    x: Any,
    s0: Any = None,
    *,
    activation: str = "tanh",
    end: int | None = None,
    example: int | None = None,
    threshold: float = 1e-3,
    saturation: float = 0.99,
    iters: int = 300,
    tol: float = 1e-5,
    seed: int = 0,
) -> JacobianProducts:
    """Spectral norms of the step-Jacobian products against the lag, on the model's own states.

    x (T, B) or (T, B, D); s0 (B, H) or None. Every product ends at step ``end`` (default T−1):
    P_ℓ = ∂s_end/∂s_{end−ℓ} = Π_{j=end−ℓ+1..end} diag(1 − s_j²) W for ℓ = 0..end, per example,
    by power iteration (``product_norms``). ``activation="linear"`` drops the tanh factors (the
    products of W alone, what a linear recurrence s_t = U x_t + W s_{t−1} would give); the states
    are still used for the saturated fraction. ``example=b`` measures that example alone (its
    products, its saturated fraction) at 1/B of the cost; None uses the whole batch and reports the
    geometric mean. Returns norms (end+1,) and the summary numbers.
    """
    model = _check_model(model)
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    threshold = _check_positive_float(threshold, "threshold")
    saturation = _check_positive_float(saturation, "saturation")
    _check_int(iters, "iters", 1)
    _check_tol(tol)
    batch = _batch(model, x, None, s0)
    if end is None:
        end = batch.T - 1
    end = _check_int(end, "end", 0)
    if end >= batch.T:
        raise InputError(f"end must be a step in [0, T) = [0, {batch.T}), got {end}")
    if example is not None:
        example = _check_int(example, "example", 0)
        if example >= batch.B:
            raise InputError(f"example must index the batch, [0, B) = [0, {batch.B}), got {example}")
    be, xp, W = model.backend, model.backend.xp, model.params["W"]
    S = _states(model, batch)
    if example is not None:
        S = S[:, example : example + 1]  # (T+1, 1, H)
    if activation == "tanh":
        factors = _factors(model, S)[1 : end + 1]  # f_j = 1 − s_j² for j = 1..end: (end, B, H)
    else:
        factors = xp.ones((end, S.shape[1], model.hidden_size), dtype=model.dtype)
    pn = product_norms(W, factors, xp=xp, iters=iters, tol=tol, seed=seed)
    saturated = float(be.to_numpy((xp.abs(S[1:]) > saturation).astype(xp.float64).mean()))
    log_mean = pn.log_norms.mean(axis=1)  # log of the geometric mean over the batch
    norms = np.exp(log_mean)
    below = np.flatnonzero(norms < threshold)
    slope, intercept = _fit(log_mean)
    reach = slope is not None and slope < -NO_DECAY_SLOPE
    Wh = be.to_numpy(W).astype(np.float64)
    return JacobianProducts(
        lags=np.arange(end + 1),
        norms=norms,
        norms_per_example=np.exp(pn.log_norms),
        end=end,
        example=example,
        activation=activation,
        spectral_radius=spectral_radius(Wh),
        spectral_norm=float(np.linalg.norm(Wh, 2)),
        saturated_fraction=saturated,
        saturation=saturation,
        threshold=threshold,
        horizon=int(below[0]) if below.size else None,
        log_slope=slope,
        log_intercept=intercept,
        decay_rate=None if slope is None else float(np.exp(slope)),
        horizon_fit=(math.log(threshold) - intercept) / slope if reach else None,
        iterations=pn.iterations,
        converged=pn.converged,
    )


# -- 4. truncation bias ---------------------------------------------------------------------------
@dataclass
class TruncationBias(_ToDict):
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
    Both gradients come from ``model.loss_and_grads``. Returns arrays (len(truncates),).
    """
    model = _check_model(model)
    batch = _batch(model, x, y, s0)
    truncates = list(range(batch.T)) if truncates is None else list(truncates)
    truncates = [_check_int(k, "truncate", 0) for k in truncates]
    be, xp = model.backend, model.backend.xp
    _, full = model.loss_and_grads(batch.x, batch.y, batch.s0)
    names = [*model.params, "s0"]
    rows = []  # per k: for each name, ‖g_full − g_k‖², ⟨g_full, g_k⟩, ‖g_k‖²  (stays on the device)
    for k in truncates:
        _, g = model.loss_and_grads(batch.x, batch.y, batch.s0, truncate=k)
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
    p = slice(0, len(names) - 1)  # the parameters, without s0
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(host[:, p, 0].sum(axis=1) / fsq[p].sum())
        cos = host[:, p, 1].sum(axis=1) / np.sqrt(fsq[p].sum() * host[:, p, 2].sum(axis=1))
        by_param = {name: np.sqrt(host[:, i, 0] / fsq[i]) for i, name in enumerate(names)}
    return TruncationBias(truncate=np.asarray(truncates), rel_error=rel, cosine=cos, by_param=by_param)


# -- all of it ------------------------------------------------------------------------------------
@dataclass
class VanishReport(_ToDict):
    """Every diagnostic of one model on one batch (see each part's docstring)."""

    steps: StepGradients
    contributions: Contributions
    products: JacobianProducts
    truncation: TruncationBias


VANISH_STAGES = ("step gradients", "contributions", "Jacobian-product norms", "truncation bias")


def vanish_report(
    model: RNN,
    x: Any,
    y: Any,
    s0: Any = None,
    *,
    threshold: float = 1e-3,
    iters: int = 300,
    tol: float = 1e-5,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VanishReport:
    """All four diagnostics of ``model`` on (x, y, s0): x (T, B) or (T, B, D), y (T, B), s0 (B, H).

    ``progress(stage)``, if given, is called before each of the four (``VANISH_STAGES``).
    """
    say = progress or (lambda stage: None)
    say(VANISH_STAGES[0])
    steps = step_gradients(model, x, y, s0)
    say(VANISH_STAGES[1])
    contrib = contributions(model, x, y, s0)
    say(VANISH_STAGES[2])
    products = jacobian_products(model, x, s0, threshold=threshold, iters=iters, tol=tol, seed=seed)
    say(VANISH_STAGES[3])
    truncation = truncation_bias(model, x, y, s0)
    return VanishReport(steps=steps, contributions=contrib, products=products, truncation=truncation)


def with_spectral_radius(model: RNN, radius: float) -> RNN:
    """A copy of the model (same backend and dtype) with W rescaled so that max |eig(W)| = radius."""
    model = _check_model(model)
    radius = _check_positive_float(radius, "radius")
    rho = spectral_radius(model.params["W"])
    if rho == 0:
        raise InputError("W has spectral radius 0 (nilpotent or zero); it cannot be rescaled to another radius")
    params = dict(model.params)
    params["W"] = model.params["W"] * (radius / rho)
    return RNN.from_params(params, backend=model.backend, dtype=model.dtype)


def vanish_sweep(
    model: RNN,
    x: Any,
    y: Any,
    radii: Any,
    s0: Any = None,
    *,
    threshold: float = 1e-3,
    iters: int = 300,
    tol: float = 1e-5,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[tuple[float, VanishReport]]:
    """``vanish_report`` for copies of the model with W rescaled to each spectral radius in ``radii``.

    x (T, B) or (T, B, D); y (T, B); s0 (B, H) or None. Returns [(radius, report), ...] in order.
    An entry None in ``radii`` measures the model as it is, reported with W's own spectral radius
    (a trained model's W, say, next to rescaled copies of it). Every argument is checked before the
    first report is computed.

    ``progress(done, total, what)``, if given, is called before each diagnostic of each radius and
    once at the end (done = total = 4·len(radii)); ``what`` reads "ρ=0.5: Jacobian-product norms",
    then "done". Nothing here prints: the caller decides how to show it.
    """
    model = _check_model(model)
    radii = [None if r is None else _check_positive_float(r, "radius") for r in radii]
    if not radii:
        raise InputError("radii must hold at least one spectral radius > 0 (or None: W as it is)")
    _check_positive_float(threshold, "threshold")
    _check_int(iters, "iters", 1)
    _check_tol(tol)
    _batch(model, x, y, s0)
    sweep = []
    total = len(VANISH_STAGES) * len(radii)
    for i, r in enumerate(radii):
        name = "ρ=model" if r is None else f"ρ={r:g}"
        stages = iter(range(len(VANISH_STAGES) * i, total))

        def stage(what: str, name: str = name, stages: Any = stages) -> None:
            if progress is not None:
                progress(next(stages), total, f"{name}: {what}")

        m = model if r is None else with_spectral_radius(model, r)
        report = vanish_report(m, x, y, s0, threshold=threshold, iters=iters, tol=tol, seed=seed, progress=stage)
        sweep.append((report.products.spectral_radius if r is None else r, report))
    if progress is not None:
        progress(total, total, "done")
    return sweep


# -- what `gpubptt vanish` measures: a random model, or a trained one on its own data ----------------
DEFAULT_SEQ_LEN = 30  # T of the windows cut from a text when none is asked for


@dataclass
class VanishProblem:
    """A model and one batch to diagnose, and what they are.

    model     the RNN, on the chosen backend and in the chosen dtype
    x, y      (T, B) int token ids and their targets, on the model's backend
    about     a JSON-ready description: {"model": "random", ...} or {"checkpoint": path, "task", "data", ...}
    """

    model: RNN
    x: Any
    y: Any
    about: dict[str, Any]

    @property
    def T(self) -> int:
        return int(self.x.shape[0])

    @property
    def B(self) -> int:
        return int(self.x.shape[1])


def random_problem(
    T: int,
    H: int,
    B: int,
    vocab: int,
    *,
    backend: Any = "auto",
    dtype: Any = "float64",
    init: str = "wildml",
    seed: int = 0,
) -> VanishProblem:
    """A random model (D = K = ``vocab``) and random tokens and targets x, y (T, B), all from ``seed``.

    InsufficientMemoryError (an InputError) before anything is allocated when the diagnostics of
    these sizes cannot fit in the backend's available memory (see ``gpubptt.memory``).
    """
    backend = get_backend(backend)
    _check_memory(vocab, H, vocab, T, B, dtype, backend, random=True)
    model = RNN(vocab, H, vocab, backend=backend, dtype=dtype, init=init, seed=seed)
    be = model.backend
    rng = np.random.default_rng(seed)
    x = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) token ids
    y = be.asarray(rng.integers(0, vocab, size=(T, B)))  # (T, B) targets
    return VanishProblem(model, x, y, {"model": "random", "vocab": vocab, "init": init})


def _check_memory(D: Any, H: Any, K: Any, T: Any, B: Any, dtype: Any, be: Any, *, random: bool) -> None:
    """InsufficientMemoryError when ``vanish_sweep`` on these sizes cannot fit; bad sizes are left to their checks."""
    sizes = (D, H, K, T, B)
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in sizes):
        return
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:
        return
    estimate = vanish_memory(D, H, K, T=T, B=B, itemsize=itemsize, random=random, chunk_elements=be.chunk_elements)
    check_fits(estimate, be.available_memory(), f"diagnosing T={T}, B={B}, H={H}, D={D}, K={K} ({np.dtype(dtype)})")


def text_windows(
    ids: np.ndarray, T: int, B: int, *, seed: int = 0, what: str = "the text"
) -> tuple[np.ndarray, np.ndarray]:
    """B windows of T tokens at random starts (from ``seed``) as x, the tokens one later as y: (T, B) each.

    ids (N,) token ids of a text; needs N ≥ T + 1. Column b is ids[a_b : a_b + T] and its targets
    ids[a_b + 1 : a_b + T + 1], with a_b uniform in [0, N − T − 1] (windows may overlap).
    """
    T, B = _check_int(T, "T", 1), _check_int(B, "B", 1)
    N = len(ids)
    if N < T + 1:
        raise InputError(
            f"{what} has {N} characters; a window of T={T} and its next character need at least {T + 1}: "
            "choose a smaller T or a longer text"
        )
    starts = np.random.default_rng(seed).integers(0, N - T, size=B)  # (B,)
    at = starts[None, :] + np.arange(T)[:, None]  # (T, B)
    return ids[at], ids[at + 1]


def _encode_file(path: Any, vocab: Vocab) -> np.ndarray:
    """Token ids (N,) of a UTF-8 file in ``vocab``; InputError naming the first character not in it."""
    text = read_text(path)
    try:
        return vocab.encode(text)
    except InputError:
        known = set(vocab.chars)
        i, ch = next((i, ch) for i, ch in enumerate(text) if ch not in known)
        raise InputError(
            f"{str(path)!r}: character {ch!r} (offset {i}) is not in the model's vocabulary of "
            f"{len(vocab)} characters {vocab.chars!r}"
        ) from None


def checkpoint_problem(
    path: Any,
    *,
    T: int | None = None,
    B: int = 8,
    seed: int = 0,
    backend: Any = "auto",
    dtype: Any = None,
    text: Any = None,
) -> VanishProblem:
    """The model of a checkpoint (from ``gpubptt train``) and a batch of its own kind of data.

    Text models: B windows of T characters (default ``DEFAULT_SEQ_LEN``) from the UTF-8 file
    ``text``, encoded with the checkpoint's vocabulary, or else from the held-out part of the text
    the checkpoint was trained on (rebuilt by ``gpubptt.data.make_data`` from its data spec); the
    targets are the next characters. Copy/recall models: B fresh sequences of the task, whose
    length L = 2k + delay is T (a given T must equal it). Returns x, y (T, B), drawn from ``seed``.
    ``dtype=None`` keeps the checkpoint's dtype; float64 widens float32 weights exactly.

    Raises CheckpointError (an InputError) for a missing or bad file, InputError for data that does
    not fit the model (the first character outside the vocabulary is named), InsufficientMemoryError
    for T and B whose diagnostics cannot fit in memory, all before any work.
    """
    if T is not None:
        T = _check_int(T, "T", 1)
    B, seed = _check_int(B, "B", 1), _check_int(seed, "seed", 0)
    where = f"checkpoint {str(path)!r}"
    ck = load_checkpoint(path, backend=backend)
    spec = ck.data or {}
    kind = spec.get("kind", "text" if ck.vocab is not None else None)
    m = ck.model
    if kind in ("copy", "recall") and T is None:
        with_T = make_data(spec).seq_len
    else:
        with_T = DEFAULT_SEQ_LEN if T is None else T
    _check_memory(m.input_size, m.hidden_size, m.output_size, with_T, B, dtype or m.dtype, m.backend, random=False)
    model = m if dtype is None else RNN.from_params(m.params, backend=m.backend, dtype=dtype)
    if kind in ("copy", "recall"):
        if text is not None:
            raise InputError(
                f"{where} was trained on the {kind} task, which makes its own sequences; "
                "a text file applies to text models only"
            )
        task = make_data(spec)
        if (task.input_size, task.output_size) != (model.input_size, model.output_size):
            raise CheckpointError(
                f"{where}: the {kind} task has D={task.input_size}, K={task.output_size} but the model has "
                f"D={model.input_size}, K={model.output_size}"
            )
        if T is not None and T != task.seq_len:
            raise InputError(
                f"{where}: the {kind} task's sequences have T = 2·{task.k} + delay {task.delay} = {task.seq_len} "
                f"steps; T={T} does not apply"
            )
        x, y = task.sample(np.random.default_rng(seed), B)  # (L, B) each
        data = f"{task.A} symbols, length {task.k}, delay {task.delay}"
    elif kind == "text":
        if ck.vocab is None:
            raise CheckpointError(f"{where} describes text data but holds no vocabulary to encode it with")
        T = DEFAULT_SEQ_LEN if T is None else T
        if text is not None:
            ids, data = _encode_file(text, ck.vocab), str(text)
        elif ck.data is None:
            raise InputError(f"{where} holds a vocabulary but no description of its training text; give a text file")
        else:
            source = spec.get("source", "builtin")
            try:
                ids = make_data(spec, vocab=ck.vocab).val_ids  # the held-out last part
            except InputError as exc:
                raise InputError(f"{where}: its training text cannot be rebuilt ({exc}); give a text file") from None
            data = f"held-out text of {'the built-in corpus' if source == 'builtin' else repr(source)}"
        x, y = text_windows(ids, T, B, seed=seed, what=data)
    else:
        raise InputError(
            f"{where} holds no vocabulary and no copy/recall task (data kind {kind!r}): no data fits its model"
        )
    about = {
        "checkpoint": str(path),
        "step": ck.state.step,
        "task": kind,
        "data": data,
        "D": model.input_size,
        "K": model.output_size,
        "init": ck.meta["model"].get("init", "custom"),
    }
    be = model.backend
    return VanishProblem(model, be.asarray(x), be.asarray(y), about)


# -- the picture ----------------------------------------------------------------------------------
def require_matplotlib() -> None:
    """Raise ImportError with an install hint when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"plotting needs matplotlib, which is not installed; {PLOT_HINT}") from exc


def plot_vanish(sweep: list[tuple[float, VanishReport]], path: Any, *, title: str | None = None) -> None:
    """Write one PNG of a ``vanish_sweep``: three curves on top, one contribution heatmap per radius below.

    Top: the Jacobian-product norm against the lag (log axis; dashed: ρ(W)^lag), the through-time
    gradient ‖δ_{t+1} @ W‖ against the step t, and the truncation bias against the window k.
    Bottom: log10 of ‖E_t's contribution to ∂E/∂W through step k‖ / its largest, rows t, columns k.
    """
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not sweep:
        raise InputError("nothing to plot: the sweep is empty")
    n = len(sweep)
    fig = Figure(figsize=(max(14.0, 3.0 * n), 9.0), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.1, 1])
    ax_top = top.subplots(1, 3)
    ax_heat = np.atleast_1d(bottom.subplots(1, n, sharey=True))
    cmap = colormaps["plasma"]
    colors = [cmap(0.85 * i / max(1, n - 1)) for i in range(n)]

    ax = ax_top[0]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        p = rep.products
        rate = "—" if p.decay_rate is None else f"{p.decay_rate:.3f}"
        ax.semilogy(p.lags, p.norms, color=color, lw=2, label=f"ρ(W)={radius:g}: ×{rate}/step")
        ax.semilogy(p.lags, p.spectral_radius ** p.lags.astype(float), color=color, lw=1, ls="--", alpha=0.7)
    thr = sweep[0][1].products.threshold
    ax.axhline(thr, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("lag t − k")
    ax.set_ylabel("‖Π diag(1 − s_j²) W‖₂, geometric mean over the batch")
    ax.set_title("Jacobian product vs lag (dashed: ρ(W)^lag)", fontsize=11)
    ax.legend(fontsize=8)

    ax = ax_top[1]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        st = rep.steps
        t = np.arange(len(st.total))
        ax.semilogy(t[:-1], st.through_time[:-1], color=color, lw=2, label=f"ρ(W)={radius:g}")
        ax.semilogy(t, st.direct, color=color, lw=1, ls="--", alpha=0.7)
    ax.set_xlabel("step t")
    ax.set_ylabel("Frobenius norm over (B, H)")
    ax.set_title("∂E/∂s_t: through time δ_{t+1} W (solid), direct do_t V (dashed)", fontsize=11)
    ax.legend(fontsize=8)

    ax = ax_top[2]
    for (radius, rep), color in zip(sweep, colors, strict=True):
        tb = rep.truncation
        err = np.where(tb.rel_error > 0, tb.rel_error, np.nan)  # exact windows have no log
        ax.semilogy(tb.truncate, err, color=color, lw=2, marker=".", label=f"ρ(W)={radius:g}")
    ax.set_xlabel("truncate k (E_t's gradient flows through k+1 steps)")
    ax.set_ylabel("‖g_full − g_k‖ / ‖g_full‖")
    ax.set_title("truncation bias of the parameter gradient", fontsize=11)
    ax.legend(fontsize=8)

    norm = Normalize(vmin=-8, vmax=0)
    image = None
    for ax, (radius, rep) in zip(ax_heat, sweep, strict=True):
        C = rep.contributions.norms
        T = C.shape[0]
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.log10(C / C.max()) if C.max() > 0 else np.full_like(C, np.nan)
        rel[np.triu_indices(T, 1)] = np.nan
        rel[~np.isfinite(rel)] = np.nan
        image = ax.imshow(rel, cmap="viridis", norm=norm, origin="upper", interpolation="nearest")
        ax.set_title(f"ρ(W)={radius:g}", fontsize=10)
        ax.set_xlabel("k (step reached)")
    ax_heat[0].set_ylabel("t (loss step)")
    bottom.colorbar(image, ax=ax_heat, shrink=0.85, label="log10 (norm / largest)")
    bottom.suptitle("‖E_t's term of ∂E/∂W through step k‖, rows t, columns k", fontsize=11)
    if title:
        top.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
