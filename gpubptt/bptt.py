"""The tanh recurrences of BPTT as functions (kept for code written against them; new code uses the
engine and the cell). Rows are examples; S (T+1, B, H) with S[0] = s0 and S[t+1] = s_t.

    forward:   s_t = tanh(x_t @ U.T + b + s_{t-1} @ W.T)
    backward:  δ_t = (do_t @ V + δ_{t+1} @ W) ⊙ (1 − s_t²),     δ_T = 0
"""

from __future__ import annotations

from typing import Any

from .backend import Backend
from .cells import ElmanCell
from .engine import backward_truncated as _engine_backward_truncated
from .engine import input_projection, input_weight_grad

__all__ = [
    "backward_full",
    "backward_truncated",
    "input_projection",
    "input_weight_grad",
    "recurrence_forward",
    "tanh_derivative",
]

_CELL = ElmanCell()


def recurrence_forward(pre: Any, W: Any, S: Any, *, be: Backend, hw: Any) -> None:
    """s_t = tanh(pre_t + s_{t-1} @ W.T) for t = 0..T-1, in place: pre (T, B, H), S (T+1, B, H), hw (B, H)."""
    _CELL.forward(pre, W, S, be=be, scratch=hw, step_kernels=be.step_kernels)


def tanh_derivative(S: Any, *, be: Backend, out: Any) -> Any:
    """1 − s_t² for every step: S (T+1, B, H) → out (T, B, H)."""
    return _CELL.factors(S, be=be, out=out)


def backward_full(G: Any, W: Any, Dt: Any, *, be: Backend, carry: Any) -> None:
    """Full BPTT in place: G (T, B, H) from ∂E_t/∂s_t to δ_t; Dt (T, B, H) = 1 − s_t²; carry (B, H)."""
    _CELL.backward(G, W, Dt, be=be, carry=carry, step_kernels=be.step_kernels)


def backward_truncated(G: Any, W: Any, Dt: Any, k: int, *, be: Backend, lanes: Any, spare: Any) -> None:
    """Tutorial-truncated BPTT with window k in place on G; lanes, spare (k+1, B, H) scratch."""
    _engine_backward_truncated(_CELL, G, W, Dt, k, be=be, lanes=lanes, spare=spare)
