"""The optimizers' settings, checked: each a number of the right kind and range, or an InputError naming the
setting and what it takes (the learning rate, ε, Adam's betas, momentum-like fractions, weight decay), what
an optimizer's ``constrain`` takes, and a step's arguments (the gradients, the loss and the norm)."""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError, ShapeError
from ..model import RNN

#: The largest learning rate accepted. Sensible rates lie far below: about 1e-4 to 1e-2 for Adam,
#: 1e-3 to 1 for SGD and Adagrad on the mean loss; a rate past this bound only overflows the weights.
LR_MAX = 1e3
LR_RANGE = "sensible values are about 1e-4 to 1e-2 for adam and 1e-3 to 1 for sgd and adagrad"
NUMBER = (int, float, np.floating, np.integer)


def in_float_range(value: Any) -> bool:
    """Whether a number is finite as a float: False for NaN, infinities and an int too large for ``float()``
    (compared as Python numbers, so a NumPy float32 is not cast against the float64 bound)."""
    v = value.item() if isinstance(value, np.generic) else value
    return bool(abs(v) <= sys.float_info.max)


def _is_real(value: Any) -> bool:
    """A number (not a bool) within float range."""
    return isinstance(value, NUMBER) and not isinstance(value, bool) and in_float_range(value)


def _check_lr(lr: Any) -> float:
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise InputTypeError(f"lr must be a positive number, got {type(lr).__name__} {lr!r}")
    if not (in_float_range(lr) and 0 < lr <= LR_MAX):
        raise InputError(f"lr must be a finite number in (0, {LR_MAX:g}], got {lr}; {LR_RANGE}")
    return float(lr)


def _check_unit(value: Any, name: str, *, closed: bool = False) -> float:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    if not ok or not (0 <= value <= 1 if closed else 0 <= value < 1):
        interval = "[0, 1]" if closed else "[0, 1)"
        raise InputError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_nonnegative(value: Any, name: str, why: str = "") -> float:
    """A finite number ≥ 0 as a float (what a checkpoint stores), else InputError naming ``name``."""
    if not (_is_real(value) and value >= 0):
        raise InputError(f"{name} must be a finite number ≥ 0{why}, got {value!r}")
    return float(value)


def _check_eps(value: Any, optimizer: str) -> float:
    """ε of Adagrad and Adam: > 0, since their update divides by √(…) + ε, which is 0 where a gradient and its
    state are exactly zero (an input column no batch uses, from the first step on)."""
    if not (_is_real(value) and value > 0):
        raise InputError(
            f"eps of {optimizer} must be a finite number > 0, got {value!r}: the update divides by a root of the "
            "squared gradients plus eps, so with eps = 0 a gradient that is exactly zero (and zero state) gives "
            "0/0 = NaN; 1e-8 is usual"
        )
    return float(value)


def _check_betas(betas: Any) -> tuple[float, float]:
    """Adam's (β₁, β₂): a pair of numbers in [0, 1)."""
    pair = isinstance(betas, (tuple, list)) or (isinstance(betas, np.ndarray) and betas.ndim == 1)
    if not (pair and len(betas) == 2 and all(_is_real(b) and 0 <= b < 1 for b in betas)):
        raise InputError(f"betas of adam must be a pair of numbers in [0, 1) (β₁, β₂), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _check_decay(value: Any) -> float:
    return _check_nonnegative(value, "weight_decay")


def _takes_values(fn: Any) -> bool:
    """Whether ``fn`` (an optimizer's ``constrain``) takes the new values: ``RNN.constrain`` itself, or a callable with
    a required positional parameter (a subclass's ``constrain(self, params)``); else it is a caller's own projection
    of the parameters, called with no arguments (as ``constrain`` was before), an optional parameter left alone."""
    if getattr(fn, "__func__", None) is RNN.constrain:
        return True
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a signature that cannot be read: called as before
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)


def _param_grads(params: Mapping[str, Any], grads: Mapping[str, Any]) -> list[tuple[str, Any]]:
    missing = [k for k in params if k not in grads]
    if missing:
        raise InputError(f"grads is missing {missing}; expected a gradient for every parameter {list(params)}")
    out = []
    for k, p in params.items():
        g = grads[k]
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            raise InputTypeError(f"gradient {k} must be an array shaped like the parameter, got {type(g).__name__}")
        if tuple(g.shape) != tuple(p.shape):
            raise ShapeError(f"gradient {k} has shape {tuple(g.shape)}, expected {tuple(p.shape)} like the parameter")
        out.append((k, g))
    return out


def _check_scalar(value: Any, name: str) -> None:
    """InputError/InputTypeError unless ``value`` is None or one real number: a Python int or float (not a bool), or
    an array or NumPy scalar of one real element (a 0-d loss on the backend)."""
    if value is None:
        return
    if isinstance(value, bool) or (not isinstance(value, int | float) and not hasattr(value, "dtype")):
        raise InputTypeError(f"{name} must be one real number (a 0-d array or a float), got {type(value).__name__}")
    if hasattr(value, "dtype"):
        kind = _kind(value.dtype)  # None: another library's dtype (a torch tensor): read as before, by NumPy
        if kind is not None and kind not in "fiu":
            raise InputTypeError(f"{name} must be one real number, got dtype {value.dtype}")
        if math.prod(tuple(getattr(value, "shape", ()))) != 1:
            raise InputError(f"{name} must be one number (a 0-d array), got shape {tuple(value.shape)}")


def _kind(dtype: Any) -> str | None:
    """A dtype's kind as NumPy names them ("f", "i", "c", "b", …), another library's (torch's) by its flags; None
    where unknown."""
    try:
        return np.dtype(dtype).kind
    except TypeError:
        if getattr(dtype, "is_complex", False):
            return "c"
        if getattr(dtype, "is_floating_point", False):
            return "f"
        return "b" if str(dtype).endswith("bool") else None


def _check_real(grads: list[tuple[str, Any]]) -> None:
    """InputTypeError naming the first gradient (a backend array, checked as such already) of no real dtype."""
    for k, g in grads:
        if np.dtype(g.dtype).kind not in "fiu":
            raise InputTypeError(f"gradient {k} must hold real numbers (a float array), got dtype {np.dtype(g.dtype)}")


def _check_unshared(params: Mapping[str, Any], xp: Any) -> None:
    """InputError naming two parameters whose arrays share memory: the optimizer updates each by its name, so one
    array under two names would keep the last name's update only (a tied weight needs one name). Only arrays whose
    byte ranges overlap are compared (a sweep over the ranges: thousands of parameters check in milliseconds), then
    exactly (blocks of one buffer that share no element are apart)."""
    overlap, exact = getattr(xp, "may_share_memory", None), getattr(xp, "shares_memory", None)
    if overlap is None:
        return
    items = list(params.items())
    for i, j in _overlapping(items):
        (a, pa), (b, pb) = items[i], items[j]
        if overlap(pa, pb) and (exact is None or exact(pa, pb)):
            raise InputError(
                f"parameters {a} and {b} share memory; the optimizer updates each parameter by its name, so the "
                f"shared array would keep only the last one's update: give each its own array (e.g. .copy())"
            )


def _overlapping(items: list[tuple[str, Any]]) -> list[tuple[int, int]]:
    """The index pairs (i < j) of ``items`` whose arrays' byte ranges overlap (NumPy's ``byte_bounds``); every pair
    where a range cannot be read (another library's arrays)."""
    try:
        from numpy.lib.array_utils import byte_bounds
    except ImportError:  # NumPy 1.x
        byte_bounds = np.byte_bounds

    try:
        spans = sorted((*byte_bounds(a), i) for i, (_, a) in enumerate(items))
    except (TypeError, AttributeError, ValueError):
        return [(i, j) for i in range(len(items)) for j in range(i + 1, len(items))]
    pairs, open_ = [], []  # open_: (end, index) of the ranges that reach past the current start
    for lo, hi, i in spans:
        open_ = [(end, k) for end, k in open_ if end > lo]
        pairs += [(min(i, k), max(i, k)) for _, k in open_]
        open_.append((hi, i))
    return sorted(pairs)
