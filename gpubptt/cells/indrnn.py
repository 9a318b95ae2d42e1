"""The IndRNN cell (Li, Li, Cook, Zhu, Gao, CVPR 2018, "Independently Recurrent Neural Network"): each unit
recurs on itself alone, through a vector w instead of a matrix W.

    s_t = φ(U x_t + b + w ⊙ s_{t−1})                   U (H, D), w (H,), b (H,); φ = relu (the paper's) or tanh
    δ_t = (∂E_t/∂s_t + δ_{t+1} ⊙ w) ⊙ f_t              the backward recursion, δ_T = 0; f_t = φ' read from s_t
    ∂s_t/∂s_{t−1} = diag(f_t ⊙ w)                      the step Jacobian: diagonal
    dw = Σ_t Σ_b δ_t ⊙ s_{t−1}     ds0 = δ_0 ⊙ w       (dU, db and ∂E/∂x: the engine's GEMMs over all steps)

Since the step Jacobian is diagonal, the gradient reaching s_k from E_t is Π_{j=k+1..t} f_j w, one unit
at a time: |w_i| ≤ γ^{1/T} bounds that product by γ over T steps where f ≤ 1 (the paper's gradient
horizon rule; γ = 2 for relu, the bound it uses). ``max_weight`` enforces it: every step of an optimizer
built on the model (``make_optimizer(name, model)``) ends by clipping w into [−max_weight, max_weight]
(``constrain``; ``horizon_bound(T, γ)`` gives γ^{1/T}). w starts uniform in [0, min(1, max_weight)]: every
unit keeps some memory and none grows.

There is no GEMM in the recurrence: one step forward and one step back are each one fused
elementwise kernel on CuPy (``_FORWARD_*``, ``_BACKWARD_*``), or their NumPy twins (a few ``out=``
operations on preallocated buffers). Truncation (``truncate=k``) reuses the Elman cell's lanes
(``elman.backward_truncated``) with this cell's diagonal ``step_back``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import Backend
from ..errors import InputError
from ._per_backend import PerBackend
from .base import Cell, register_cell
from .elman import NONLINEARITIES, backward_truncated, phi_prime

__all__ = ["IndRNNCell", "horizon_bound", "kernels"]


def horizon_bound(T: int, gamma: float = 2.0) -> float:
    """γ^{1/T}: the bound on |w_i| under which a unit's gradient grows at most γ-fold over T steps (f ≤ 1).

    T an int ≥ 1 (steps), γ a finite number > 0; else InputError naming the argument."""
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer)) or T < 1:
        raise InputError(f"T must be an int ≥ 1 (the number of steps), got {T!r}")
    return _positive(gamma, "gamma must be a finite number > 0 (the largest growth over T steps)") ** (1.0 / int(T))


def _positive(value: Any, rule: str) -> float:
    """``value`` as a float where it is a real number (Python's or NumPy's), finite and > 0; else InputError
    "{rule}, got {value!r}"."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    try:
        number = float(value) if real else math.nan
    except OverflowError:  # an int past float's range
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"{rule}, got {value!r}")
    return number


@register_cell
class IndRNNCell(Cell):
    """IndRNN: s_t = φ(U x_t + b + w ⊙ s_{t−1}); see the module docstring.

    ``nonlinearity`` "relu" (the default, the paper's) or "tanh"; ``max_weight`` None (w free) or the bound
    γ^{1/T} on |w_i| that every step of an optimizer built on the model clips w to. Parameters per
    recurrence: U (H, D_l), w (H,), b (H,) with biases. torch has no IndRNN: ``to_torch``/``from_torch`` refuse it.
    """

    option = "indrnn"
    takes_nonlinearity = True
    #: s is the whole state (recomputation may keep s alone)
    extra_state = False

    def __init__(self, nonlinearity: str = "relu", max_weight: float | None = None) -> None:
        if nonlinearity not in NONLINEARITIES:
            raise InputError(f"unknown nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")
        if max_weight is not None:
            max_weight = _positive(max_weight, "max_weight must be None or a finite number > 0 (γ^(1/T))")
        self.nonlinearity = nonlinearity
        self.max_weight = max_weight

    def options(self) -> dict[str, Any]:
        """{"nonlinearity": φ, "max_weight": bound or None}."""
        return {"nonlinearity": self.nonlinearity, "max_weight": self.max_weight}

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> IndRNNCell:
        """IndRNNCell(nonlinearity or "relu", max_weight=...); InputError on an unknown option or value."""
        unknown = sorted(set(options) - {"max_weight"})
        if unknown:
            raise InputError(f"cell 'indrnn' takes nonlinearity and max_weight, got {unknown}")
        return cls("relu" if nonlinearity is None else nonlinearity, **options)

    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """U (H, D), w (H,) the recurrent weights, one per unit; b (H,) with ``bias``."""
        shapes: dict[str, tuple[int, ...]] = {"U": (H, D), "w": (H,)}
        if bias:
            shapes["b"] = (H,)
        return shapes

    def init_bounds(self, base: str, shape: tuple[int, ...], scheme: str, H: int) -> tuple[float, float] | None:
        """w ~ U(0, min(1, max_weight)) under every scheme; U and b as the base class says."""
        if base == "w":
            return (0.0, 1.0 if self.max_weight is None else min(1.0, self.max_weight))
        return super().init_bounds(base, shape, scheme, H)

    def constrain(self, p: dict[str, Any], *, xp: Any) -> None:
        """Clip w into [−max_weight, max_weight] in place (nothing without ``max_weight``)."""
        if self.max_weight is not None:
            xp.clip(p["w"], -self.max_weight, self.max_weight, out=p["w"])

    def constraint_violation(self, params: dict[str, Any]) -> str | None:
        """Which w (w, w_l1, w_reverse, …) holds a value beyond ``max_weight`` (as its dtype rounds the bound)."""
        if self.max_weight is None:
            return None
        for k, a in params.items():
            if (k == "w" or k.startswith("w_")) and a.size:
                bound = np.asarray(self.max_weight, dtype=a.dtype)
                if (np.abs(a) > bound).any():
                    return (
                        f"parameter {k} has |w| up to {float(np.abs(a).max())!r}, beyond the cell's max_weight = "
                        f"{self.max_weight!r}"
                    )
        return None

    # -- the engine's interface ----------------------------------------------------------------
    def run_forward(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, scratch: Any, step_kernels: str
    ) -> None:
        """s_t = φ(pre_t + w ⊙ s_{t−1}) for every step: pre (T, B, H) = U x_t + b, S (T+1, B, H) with S[0] = s0."""
        k, w = kernels(be), p["w"]
        step = k.forward_tanh if self.nonlinearity == "tanh" else k.forward_relu
        for t in range(pre.shape[0]):
            step(pre[t], w, S[t], S[t + 1])

    def run_backward(
        self, G: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Backend, work: Any, scratch: Any,
        step_kernels: str, truncate: int | None, lanes: Any, grads: dict[str, Any], ds0: Any,
    ) -> Any:  # fmt: skip
        """BPTT in place on G (T, B, H): ∂E/∂s_t in, δ_t = ∂E/∂pre_t out (returned); dw into grads["w"], ds0."""
        xp, w = be.xp, p["w"]
        T, B, H = G.shape
        if T > 0 and truncate is None:
            k = kernels(be)
            step = k.backward_tanh if self.nonlinearity == "tanh" else k.backward_relu
            zero = work[0]  # δ_T = 0
            zero[...] = 0
            for t in range(T - 1, -1, -1):
                step(G[t + 1] if t + 1 < T else zero, w, S[t + 1], G[t], scratch)  # δ_t = (g_t + δ_{t+1} ⊙ w) ⊙ f_t
        elif T > 0:
            F = self.factors(S, be=be, out=work)
            backward_truncated(self, G, w, F, truncate, be=be, lanes=lanes[0], spare=lanes[1])
        xp.multiply(G, S[:-1], out=work)  # δ_t ⊙ s_{t−1}
        be.sum_rows(work.reshape(T * B, H), out=grads["w"])  # dw = Σ_t Σ_b δ_t ⊙ s_{t−1}
        if T > 0:
            xp.multiply(G[0], w, out=ds0)  # ds0 = δ_0 ⊙ w
        else:
            ds0[...] = 0
        return G

    # -- truncation's lanes (elman.backward_truncated) -------------------------------------------
    def factors(self, S: Any, *, be: Backend, out: Any) -> Any:
        """φ' at every step from the states: S (T+1, B, H) → out (T, B, H) (tanh 1 − s², relu 1 where s > 0)."""
        return phi_prime(S[1:], self.nonlinearity, xp=be.xp, out=out)

    @staticmethod
    def step_back(lanes: Any, w: Any, f: Any, out: Any, *, be: Backend) -> None:
        """δ-gradients one step back for a stack of lanes: out = lanes ⊙ w ⊙ f; lanes, out (N, B, H), f (B, H)."""
        be.xp.multiply(lanes, w, out=out)
        out *= f

    @staticmethod
    def enter(g: Any, f: Any, out: Any, *, be: Backend) -> None:
        """A state gradient into the pre-activation: out = g ⊙ f; all (B, H)."""
        be.xp.multiply(g, f, out=out)

    def activate(self, a: Any, *, xp: Any) -> Any:
        """φ(a), a new array."""
        return xp.tanh(a) if self.nonlinearity == "tanh" else xp.maximum(a, 0)

    # -- diagnostics, bench --------------------------------------------------------------------
    def step_jacobian(self, p: dict[str, np.ndarray], S: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """∂s_t/∂s_{t−1} = diag(f_t ⊙ w), (T, B, H, H) dense (zero off the diagonal)."""
        f = phi_prime(S[1:], self.nonlinearity, xp=np, out=np.empty_like(S[1:]))
        T, B, H = f.shape
        J = np.zeros((T, B, H, H), dtype=S.dtype)
        i = np.arange(H)
        J[:, :, i, i] = f * p["w"]
        return J

    def flops_per_step(self, B: int, D: int, H: int, *, backward: bool) -> int:
        """Forward U x (2·B·H·D) and w ⊙ s (2·B·H); backward dU (2·B·H·D), δ ⊙ w and dw (4·B·H)."""
        return 2 * B * H * D + (4 if backward else 2) * B * H

    def sequential_flops_per_step(self, B: int, H: int) -> int:
        """None: the recurrence w ⊙ s is elementwise, no GEMM waits on the step before."""
        return 0


# -- kernels: one fused elementwise kernel per step (CuPy), or the NumPy twins ---------------------
# w (H,) broadcasts against the (B, H) rows; f = φ' is read from the state s_t itself
_FORWARD_TANH = "out = tanh(pre + w * sprev)"
_FORWARD_RELU = "const T a = pre + w * sprev; out = a < (T)0 ? (T)0 : a"  # not CUDA's max: NaN stays NaN, as NumPy's
_BACKWARD_TANH = "g = (g + dnext * w) * ((T)1 - s * s)"
_BACKWARD_RELU = "g = (g + dnext * w) * (T)(s > (T)0)"


class _Kernels:
    """One backend's IndRNN step kernels: compiled elementwise kernels where the backend compiles, else twins."""

    def __init__(self, be: Backend) -> None:
        self.xp = be.xp
        fwd = "T pre, T w, T sprev"
        self._fwd_tanh = be.elementwise(fwd, "T out", _FORWARD_TANH, "gpubptt_indrnn_forward_tanh")
        self._fwd_relu = be.elementwise(fwd, "T out", _FORWARD_RELU, "gpubptt_indrnn_forward_relu")
        bwd = "T dnext, T w, T s"
        self._bwd_tanh = be.elementwise(bwd, "T g", _BACKWARD_TANH, "gpubptt_indrnn_backward_tanh")
        self._bwd_relu = be.elementwise(bwd, "T g", _BACKWARD_RELU, "gpubptt_indrnn_backward_relu")

    def forward_tanh(self, pre: Any, w: Any, sprev: Any, out: Any) -> None:
        """out = tanh(pre + w ⊙ sprev); pre, sprev, out (B, H), w (H,)."""
        if self._fwd_tanh is not None:
            self._fwd_tanh(pre, w, sprev, out)
            return
        self.xp.multiply(sprev, w, out=out)
        out += pre
        self.xp.tanh(out, out=out)

    def forward_relu(self, pre: Any, w: Any, sprev: Any, out: Any) -> None:
        """out = max(pre + w ⊙ sprev, 0)."""
        if self._fwd_relu is not None:
            self._fwd_relu(pre, w, sprev, out)
            return
        self.xp.multiply(sprev, w, out=out)
        out += pre
        self.xp.maximum(out, 0, out=out)

    def backward_tanh(self, dnext: Any, w: Any, s: Any, g: Any, scratch: Any) -> None:
        """g = (g + dnext ⊙ w) ⊙ (1 − s²): g enters as ∂E_t/∂s_t, leaves as δ_t; scratch (B, H)."""
        if self._bwd_tanh is not None:
            self._bwd_tanh(dnext, w, s, g)
            return
        self.xp.multiply(dnext, w, out=scratch)
        g += scratch
        self.xp.multiply(s, s, out=scratch)
        self.xp.subtract(1, scratch, out=scratch)
        g *= scratch

    def backward_relu(self, dnext: Any, w: Any, s: Any, g: Any, scratch: Any) -> None:
        """g = (g + dnext ⊙ w) ⊙ [s > 0]."""
        if self._bwd_relu is not None:
            self._bwd_relu(dnext, w, s, g)
            return
        self.xp.multiply(dnext, w, out=scratch)
        g += scratch
        self.xp.greater(s, 0, out=scratch)
        g *= scratch


#: ``kernels(be)``: the IndRNN kernels of backend ``be`` (built once per backend)
kernels: PerBackend[_Kernels] = PerBackend(_Kernels, "IndRNN kernels")
