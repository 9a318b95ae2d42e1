"""Gradient norms and clipping by the global norm (``gpubptt.training.optim`` exports them): over every gradient
but the initial state's, summed in float64, on the device (no host sync)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError
from ._optim_settings import in_float_range

__all__ = ["STATE_KEYS", "clip_grad_norm", "global_grad_norm"]

#: gradients of the initial state (an LSTM's c0 beside s0), not of parameters: no norm or update counts them
STATE_KEYS = ("s0", "c0")


def _grad_keys(grads: Mapping[str, Any], names: Any) -> list[str]:
    """The keys of ``grads`` that ``names`` picks (None: every key but "s0", "c0"); InputTypeError for one name
    given as a str (read as its characters), InputError naming a key ``grads`` does not have."""
    if names is None:
        return [k for k in grads if k not in STATE_KEYS]
    if isinstance(names, (str, bytes)):
        raise InputTypeError(
            f"names must be a list of gradient names, got the single {type(names).__name__} {names!r}; pass a list: "
            f"names=[{names!r}]"
        )
    keys = list(names)
    missing = [k for k in keys if k not in grads]
    if missing:
        raise InputError(f"names {missing} are not among the gradients {list(grads)}")
    return keys


def global_grad_norm(grads: Mapping[str, Any], *, xp: Any, names: Any = None) -> Any:
    """‖g‖ = √(Σ_k Σ g_k²) over ``names`` (default: every key but "s0", "c0"): a 0-d float64 array, no host sync.

    The per-parameter sums are added in float64, so float32 gradients whose squares are each finite
    cannot overflow the total. A name that ``grads`` lacks is an InputError.
    """
    keys = _grad_keys(grads, names)
    sq = [xp.vdot(grads[k].ravel(), grads[k].ravel()).astype(xp.float64) for k in keys]
    return xp.asarray(xp.sqrt(xp.stack(sq).sum()))  # asarray: NumPy reductions return scalars


def clip_grad_norm(grads: Mapping[str, Any], max_norm: float, *, xp: Any, names: Any = None) -> Any:
    """Scale the gradients IN PLACE so that their global norm is at most ``max_norm``; return the norm before.

    grads: arrays of any shape (default: every key but "s0", "c0"). Returns a 0-d array on the backend
    (no host sync). The direction is kept: every gradient is multiplied by the same factor
    min(1, max_norm / ‖g‖). A non-finite norm leaves the gradients untouched, so the optimizer's
    guard still sees (and names) the bad ones.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating, np.integer)):
        raise InputTypeError(f"max_norm must be a positive number, got {type(max_norm).__name__}")
    if not (in_float_range(max_norm) and max_norm > 0):
        raise InputError(f"max_norm must be a positive finite number, got {max_norm}")
    keys = _grad_keys(grads, names)
    norm = global_grad_norm(grads, xp=xp, names=keys)
    scale = xp.minimum(1.0, max_norm / (norm + 1e-12))
    scale = xp.where(xp.isfinite(norm), scale, xp.ones_like(scale))  # on the device: no host sync
    for k in keys:
        grads[k] *= scale.astype(grads[k].dtype)
    return norm
