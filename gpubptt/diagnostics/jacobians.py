"""Jacobian products against the lag: ‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ by power iteration, ρ(W), ‖W‖₂, the
gradient horizon and the fitted rate per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..errors import InputError, ShapeError
from ..model import RNN
from ._common import (
    ToDict,
    batch_of,
    check_elman,
    check_int,
    check_positive_float,
    check_tol,
    factors_of,
    states_of,
    to_host,
)

#: |log slope| below this is round-off around a flat line (an orthogonal W gives ±1e-16): no horizon.
NO_DECAY_SLOPE = 1e-9
#: The horizon is the first lag whose product norm falls below this.
DEFAULT_THRESHOLD = 1e-3
#: Most power iterations per Jacobian-product norm.
DEFAULT_ITERS = 300
ACTIVATIONS = ("tanh", "linear")


# -- 3. Jacobian products against the lag ---------------------------------------------------------
@dataclass
class ProductNorms(ToDict):
    """log ‖diag(f_n) W · diag(f_{n−1}) W ⋯ diag(f_{n−ℓ+1}) W‖₂ for ℓ = 0..n, per example.

    log_norms (n+1, B)  row ℓ: the natural log of the largest singular value of the ℓ-step product
                        for each example (row 0: the identity, log 1 = 0; −inf where the product is 0)
    iterations          power iterations run; converged: whether every lag met the tolerance
    """

    log_norms: np.ndarray
    iterations: int
    converged: bool


def product_norms(
    W: Any, factors: Any, *, xp: Any, iters: int = DEFAULT_ITERS, tol: float = 1e-5, seed: int = 0
) -> ProductNorms:
    """Spectral norms of the products of the last ℓ step Jacobians diag(f_j) W, for every ℓ at once.

    W (H, H); factors (n, B, H): f_1..f_n, the diagonal of step j's Jacobian for each example
    (the cell's: 1 − s_j² for tanh, 1[s_j > 0] for relu; all ones for a linear recurrence, whose
    Jacobians are W itself).
    Returns log norms (n+1, B) for lags ℓ = 0..n, the product P_ℓ = J_n J_{n−1} ⋯ J_{n−ℓ+1}; −inf where
    P_ℓ is exactly 0 (a relu step with every unit of an example off).

    Power iteration on P_ℓᵀ P_ℓ for every lag and example together, from Jacobian–vector and
    vector–Jacobian products only (no dense Jacobian): a lane per lag, and all live lanes advance
    with one (ℓ·B, H) × (H, H) GEMM per step. Every step renormalises the vectors and keeps the
    log of the scale, so products far below or above the float range still come out right. A lag
    whose log norm moved by at most ``tol`` (≈ relative change) in one iteration, for every
    example, is done; once every longer lag is done too its lane is frozen and drops out of the
    sweeps (long products have well-separated singular values and converge first). One host sync
    per iteration, none per step.
    """
    iters = check_int(iters, "iters", 1)
    tol = check_tol(tol)
    seed = check_int(seed, "seed", 0)
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
        r = xp.sqrt((a * a).sum(axis=2, keepdims=True))
        a /= xp.maximum(r, tiny)  # a zero vector stays zero (and finite)
        return r[..., 0]  # exactly 0 for a product that is exactly 0 (a relu step with every unit off): log −inf

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
            with np.errstate(divide="ignore"):  # NumPy's warning; CuPy gives −inf silently
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
        with np.errstate(invalid="ignore"):  # −inf twice (a zero product) has not moved: −inf − −inf is NaN
            step = xp.where(logs[:hi] == prev, 0, xp.abs(logs[:hi] - prev))
        moved = to_numpy(step.max(axis=1))  # (hi,) one sync per iteration
        while hi > 0 and moved[hi - 1] <= tol:
            hi -= 1
        if hi == 0:
            break
    log_norms[1:] = logs
    return ProductNorms(log_norms=to_host(log_norms), iterations=iterations, converged=hi == 0)


@dataclass
class JacobianProducts(ToDict):
    """‖Π_{j=k+1..t} ∂s_j/∂s_{j−1}‖₂ against the lag ℓ = t − k, with the end step t fixed.

    lags (n+1,)                 0..n with n = end (k runs from end down to 0)
    norms (n+1,)                the geometric mean over the batch, exp(mean_b log ‖P_b‖₂), of the
                                per-example spectral norms (each example has its own s_j; 0 from
                                the lag where one example's product is exactly 0, as a relu step can be)
    norms_per_example (n+1, B)  the per-example spectral norms (B = 1 with ``example=b``)
    example                     the one example measured, or None for the whole batch
    end                         the step t where every product ends (default T−1, the last)
    activation                  "tanh": the model's own factors, ∂s_j/∂s_{j−1} = diag(f_j) W (the name
                                is kept; a relu model's f_j = 1[s_j > 0]); "linear": W alone
    spectral_radius, spectral_norm   max |eig(W)| and ‖W‖₂
    saturated_fraction          the fraction of all states (T, B, H) with |s| > ``saturation``
                                (of that example's states (T, H) with ``example=b``)
    threshold, horizon          the first lag whose norm is below threshold (None: none is, within n)
    log_slope, decay_rate       least-squares line log norm ≈ log_intercept + log_slope · ℓ over
                                ℓ = 1..n, and exp(slope): the fitted factor per step (< 1 vanishes,
                                > 1 explodes; None with fewer than two lags). Lags whose norm is
                                exactly 0 (log −inf) are left out of the fit, as ``gated.cell_flow`` does
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
    if Wh.ndim != 2 or Wh.shape[0] != Wh.shape[1]:
        raise ShapeError(f"spectral_radius needs a square matrix W (H, H), got shape {Wh.shape}")
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
    threshold: float = DEFAULT_THRESHOLD,
    saturation: float = 0.99,
    iters: int = DEFAULT_ITERS,
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
    model = check_elman(model, "jacobian_products")
    if activation not in ACTIVATIONS:
        raise InputError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    threshold = check_positive_float(threshold, "threshold")
    saturation = check_positive_float(saturation, "saturation")
    check_int(iters, "iters", 1)
    check_tol(tol)
    seed = check_int(seed, "seed", 0)
    batch = batch_of(model, x, None, s0)
    if end is None:
        end = batch.T - 1
    end = check_int(end, "end", 0)
    if end >= batch.T:
        raise InputError(f"end must be a step in [0, T) = [0, {batch.T}), got {end}")
    if example is not None:
        example = check_int(example, "example", 0)
        if example >= batch.B:
            raise InputError(f"example must index the batch, [0, B) = [0, {batch.B}), got {example}")
    be, xp, W = model.backend, model.backend.xp, model.params["W"]
    S = states_of(model, batch)
    if example is not None:
        S = S[:, example : example + 1]  # (T+1, 1, H)
    if activation == "tanh":
        factors = factors_of(model, S)[1 : end + 1]  # f_j = 1 − s_j² for j = 1..end: (end, B, H)
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
