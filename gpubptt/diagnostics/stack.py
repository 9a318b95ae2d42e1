"""Diagnostics of stacks (``num_layers`` > 1 or bidirectional): the vanishing gradient layer by layer.

A stack has one recurrence per layer and direction; each has its own step Jacobian
∂s^l_j/∂s^l_{j−1} = diag(f^l_j) W_l, and layer l's state also feeds layer l+1 at the same step,
through U_{l+1}. Per recurrence (its own time for a reverse one) this measures what ``jacobian_products``
measures for one layer: ρ(W_l), ‖W_l‖₂, the saturated fraction, ‖Π diag(f^l_j) W_l‖₂ against the lag,
its horizon and fitted rate per step, and ‖∂E/∂s0‖ of that recurrence. For a one-direction stack it
also measures the two things only a stack has:

    step gradients  ‖∂E/∂s^l_t‖ per layer and step: the BPTT adjoints, from the loss at the top down
                    through every layer and back through time
    through stack   ‖∂s^top_end/∂s^l_{end−ℓ}‖₂ for every source layer l and lag ℓ: how much the top
                    state at the last step still depends on layer l's state ℓ steps earlier, along
                    every path through the stack (up through U, back through each W). For the top
                    layer it is that layer's own product; for layer 0 the paths climb the whole stack.

The Jacobians through the stack are dense: the adjoints of all H unit vectors at the top, for every
example at once ((H·B, H) rows per layer, L·H·B·H numbers held), and their spectral norms by SVD on
the host (L·T SVDs of (B, H, H) batches). Elman cells (their step factors); one-direction stacks.
The adjoint recursion, for a seed at the top layer:

    a^{L−1}_j += seed_j;  for l = L−1 … 0:  δ^l_j = a^l_j ⊙ f^l_j,  a^{l−1}_j += δ^l_j U_l,  a^l_{j−1} = δ^l_j W_l
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..engine import stack as engine
from ..errors import InputError
from ..model import RNN
from ..validation import check_batch
from ._common import (
    ToDict,
    check_elman,
    check_int,
    check_list,
    check_positive_float,
    check_tol,
    json_value,
    plain_copy,
    to_host,
)
from .jacobians import DEFAULT_ITERS, DEFAULT_THRESHOLD, NO_DECAY_SLOPE, _fit, product_norms, spectral_radius

__all__ = ["RecurrenceFlow", "StackReport", "ThroughStack", "stack_report", "stack_sweep", "with_radius"]


@dataclass
class Decay(ToDict):
    """A curve of norms against the lag and what it says: norms (n+1,), horizon (first lag below
    threshold, None: none), decay_rate (exp of the fitted log slope, None with < 2 lags), horizon_fit
    (where the fitted line crosses the threshold; None unless it decays)."""

    norms: np.ndarray
    horizon: int | None
    decay_rate: float | None
    horizon_fit: float | None


def _decay(log_norms: np.ndarray, threshold: float) -> Decay:
    """log_norms (n+1,) (the log of a geometric mean over examples) → Decay."""
    norms = np.exp(log_norms)
    below = np.flatnonzero(norms < threshold)
    slope, intercept = _fit(log_norms)
    reach = slope is not None and slope < -NO_DECAY_SLOPE
    return Decay(
        norms=norms,
        horizon=int(below[0]) if below.size else None,
        decay_rate=None if slope is None else float(np.exp(slope)),
        horizon_fit=(math.log(threshold) - intercept) / slope if reach else None,
    )


@dataclass
class RecurrenceFlow(ToDict):
    """One recurrence of the stack: ``name`` its parameters' suffix ("" for layer 0 forward, "_l1",
    "_reverse", …), ``layer``, ``direction``; spectral_radius and spectral_norm of its W; the
    saturated fraction of its states (|s| > 0.99); ``own`` its own step-Jacobian products against the
    lag (Decay); ``grad_s0`` ‖∂E/∂s0‖ of this recurrence; ``step_gradients`` (T,) ‖∂E/∂s^l_t‖ per
    step (Frobenius over batch and units; None for a bidirectional stack)."""

    name: str
    layer: int
    direction: int
    spectral_radius: float
    spectral_norm: float
    saturated_fraction: float
    own: Decay
    grad_s0: float
    step_gradients: np.ndarray | None


@dataclass
class ThroughStack(ToDict):
    """‖∂s^top_end/∂s^l_{end−ℓ}‖₂ (geometric mean over examples) per source layer l: ``per_layer``[l]
    a Decay over lags ℓ = 0..end; ``end`` the step where every product ends."""

    end: int
    per_layer: list[Decay]

    def to_dict(self) -> dict[str, Any]:
        return {"end": self.end, "per_layer": [d.to_dict() for d in self.per_layer]}


@dataclass
class StackReport(ToDict):
    """Every recurrence's flow (torch's order) and, for a one-direction stack, the products through it."""

    recurrences: list[RecurrenceFlow]
    through_stack: ThroughStack | None
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "recurrences": [r.to_dict() for r in self.recurrences],
            "through_stack": None if self.through_stack is None else self.through_stack.to_dict(),
            "threshold": json_value(self.threshold),
        }


def _adjoints(
    model: RNN,
    F: list[Any],
    seed_at: Callable[[int], Any | None],
    visit: Callable[[int, int, Any], None],
    lanes: int = 1,
) -> None:
    """Walk a one-direction stack backward from its last step, calling ``visit(j, l, a)`` with the
    complete adjoint a (N, H) = ∂(Σ_t seed_tᵀ s^top_t)/∂s^l_j of every layer l at every step j.

    S[l] (T+1, B, H) states and F[l] (T, B, H) step factors of layer l, for N = m·B lanes (lane i·B + b
    belongs to example b); ``seed_at(j)`` (N, H) or None is added to the top layer's adjoint at step j.
    """
    xp, p, L = model.backend.xp, model.params, model.num_layers
    T, Bf, H = F[0].shape
    N = Bf * lanes
    a = [xp.zeros((N, H), dtype=model.dtype) for _ in range(L)]
    for j in range(T - 1, -1, -1):
        seed = seed_at(j)
        if seed is not None:
            a[L - 1] += seed
        for layer in range(L - 1, -1, -1):
            r = model.recurrences[layer]
            visit(j, layer, a[layer])
            d = (a[layer].reshape(lanes, Bf, H) * F[layer][j]).reshape(N, H)  # δ^l_j
            if layer > 0:
                a[layer - 1] += d @ p[r.name("U")]  # up the stack at the same step
            a[layer] = d @ p[r.name("W")]  # back through time


def stack_report(
    model: RNN,
    x: Any,
    y: Any,
    s0: Any = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    iters: int = DEFAULT_ITERS,
    tol: float = 1e-5,
    seed: int = 0,
) -> StackReport:
    """The vanishing gradient of a stack, per recurrence and through the stack (see the module docstring).

    x (T, B) or (T, B, D); y (T, B); s0 (L·dirs, B, H) or None. Elman cells (tanh or relu).
    """
    model = check_elman(model, "stack_report")
    threshold = check_positive_float(threshold, "threshold")
    check_int(iters, "iters", 1)
    seed = check_int(seed, "seed", 0)
    check_tol(tol)
    be, xp = model.backend, model.backend.xp
    H, n = model.hidden_size, model.num_states
    batch = check_batch(
        be, model.dtype, model.input_size, H, model.output_size, x, y, s0, None, for_loss=True, num_states=n
    )
    T, B = batch.T, batch.B
    S = engine.states(model, batch)
    F = [model.cell.factors(s, be=be, out=xp.empty_like(s[1:])) for s in S]
    # as the states above: no dropout masks, the softmax head, time-major inputs (the copy has none of the model's)
    plain = plain_copy(model)
    _, grads = plain.loss_and_grads(batch.x, batch.y, batch.s0_stacked)
    ds0 = to_host(grads["s0"]).reshape(n, B, H)
    steps: list[np.ndarray | None] = [None] * n
    through = None
    if not model.bidirectional:
        # ‖∂E/∂s^l_t‖: adjoints seeded with the loss's direct terms at every top-layer step
        V = model.params["V"]
        do = _softmax_minus_onehot(model, S[-1][1:], batch.y)  # (T, B, K)
        norms = xp.zeros((n, T), dtype=xp.float64)
        _adjoints(
            model, F, lambda j: do[j] @ V, lambda j, layer, a: norms.__setitem__((layer, j), xp.sqrt((a * a).sum()))
        )
        steps = list(to_host(norms))
        through = _through_stack(model, F, threshold)
    flows = []
    for r, s, f in zip(model.recurrences, S, F, strict=True):
        W = model.params[r.name("W")]
        pn = product_norms(W, f[1:], xp=xp, iters=iters, tol=tol, seed=seed)  # ending at its last step T−1
        Wh = to_host(W)
        flows.append(
            RecurrenceFlow(
                name=r.suffix,
                layer=r.layer,
                direction=r.direction,
                spectral_radius=spectral_radius(Wh),
                spectral_norm=float(np.linalg.norm(Wh, 2)),
                saturated_fraction=float(to_numpy((xp.abs(s[1:]) > 0.99).astype(xp.float64).mean())),
                own=_decay(pn.log_norms.mean(axis=1), threshold),
                grad_s0=float(np.linalg.norm(ds0[r.index])),
                step_gradients=steps[r.index],
            )
        )
    return StackReport(recurrences=flows, through_stack=through, threshold=threshold)


def _softmax_minus_onehot(model: RNN, top: Any, y: Any) -> Any:
    """do_t = softmax(V s_t + c) − onehot(y_t) for every step: (T, B, K), the gradient of E at the logits."""
    xp, p = model.backend.xp, model.params
    z = top @ p["V"].T
    if "c" in p:
        z += p["c"]
    z -= z.max(axis=2, keepdims=True)
    e = xp.exp(z)
    e /= e.sum(axis=2, keepdims=True)
    xp.put_along_axis(e, y[:, :, None], xp.take_along_axis(e, y[:, :, None], axis=2) - 1, axis=2)
    return e


def _through_stack(model: RNN, F: list[Any], threshold: float) -> ThroughStack:
    """Dense Jacobians ∂s^top_end/∂s^l_j of a one-direction stack for every layer l and step j ≤ end = T−1."""
    xp, H, L = model.backend.xp, model.hidden_size, model.num_layers
    T, B, _ = F[0].shape
    end = T - 1
    basis = xp.repeat(xp.eye(H, dtype=model.dtype), B, axis=0)  # (H·B, H): lane i·B + b, unit vector i, example b
    logs = np.zeros((L, T))

    def visit(j: int, layer: int, a: Any) -> None:
        J = to_host(a).reshape(H, B, H).transpose(1, 0, 2)  # (B, H, H): rows ∂s^top_end[i]/∂s^l_j
        # an overflowed Jacobian (relu, a huge W) never reaches the SVD, which does not converge on it: its norm
        # is inf, or nan where it holds a NaN, as the one-layer products report it
        finite = np.isfinite(J).all(axis=(1, 2))
        sv = np.where(np.isnan(J).any(axis=(1, 2)), np.nan, np.inf)
        if finite.any():
            sv[finite] = np.linalg.svd(J[finite], compute_uv=False)[:, 0]  # the spectral norm of each example's
        with np.errstate(divide="ignore"):  # an exactly-zero Jacobian (relu) is log −inf, left out of the fit
            logs[layer, end - j] = np.log(sv).mean()

    _adjoints(model, F, lambda j: basis if j == end else None, visit, lanes=H)
    return ThroughStack(end=end, per_layer=[_decay(logs[layer], threshold) for layer in range(L)])


def with_radius(model: RNN, radius: float) -> RNN:
    """A copy of the model with every recurrence's W rescaled to spectral radius ``radius``."""
    model = check_elman(model, "with_radius")
    radius = check_positive_float(radius, "radius")
    params = dict(model.params)
    for r in model.recurrences:
        W = model.params[r.name("W")]
        rho = spectral_radius(W)
        if rho == 0:
            raise InputError(f"{r.name('W')} has spectral radius 0; it cannot be rescaled to another radius")
        params[r.name("W")] = W * (radius / rho)
    return RNN.from_params(params, backend=model.backend, dtype=model.dtype, nonlinearity=model.nonlinearity)


def stack_sweep(
    model: RNN, x: Any, y: Any, radii: Any, s0: Any = None, *, threshold: float = DEFAULT_THRESHOLD,
    iters: int = DEFAULT_ITERS, progress: Callable[[int, int, str], None] | None = None,
) -> list[tuple[float | None, StackReport]]:  # fmt: skip
    """``stack_report`` for copies of the model with every W rescaled to each radius (None: as it is)."""
    model = check_elman(model, "stack_sweep")
    radii = [None if r is None else check_positive_float(r, "radius") for r in check_list(radii, "radii") or []]
    if not radii:
        raise InputError("radii must hold at least one spectral radius > 0 (or None: the model as it is)")
    out = []
    for i, r in enumerate(radii):
        if progress is not None:
            progress(i, len(radii), "ρ=model" if r is None else f"ρ={r:g}")
        m = model if r is None else with_radius(model, r)
        out.append((r, stack_report(m, x, y, s0, threshold=threshold, iters=iters)))
    if progress is not None:
        progress(len(radii), len(radii), "done")
    return out
