"""Shared pieces of the diagnostics: JSON conversion of results, argument checks, states and step factors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..backend import to_numpy
from ..engine.losses import softmax_probs
from ..errors import InputError, InputTypeError
from ..model import RNN
from ..validation import Batch, check_batch


# -- JSON helpers ---------------------------------------------------------------------------------
def json_value(v: Any) -> Any:
    """NumPy arrays and scalars as lists and floats; NaN and ±inf as None (strict JSON)."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind == "f":
            return [json_value(a) for a in v] if v.ndim > 1 else [json_float(a) for a in v]
        return v.tolist()
    if isinstance(v, (float, np.floating)):
        return json_float(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, dict):
        return {k: json_value(a) for k, a in v.items()}
    return v


def json_float(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


class ToDict:
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python (lists, floats, None for non-finite values), for JSON."""
        out = {}
        for name in self.__dataclass_fields__:  # type: ignore[attr-defined]
            v = getattr(self, name)
            out[name] = v.to_dict() if isinstance(v, ToDict) else json_value(v)
        return out


# -- validation -----------------------------------------------------------------------------------
def check_model(model: Any) -> RNN:
    if not isinstance(model, RNN):
        raise InputTypeError(f"model must be a gpubptt.RNN, got {type(model).__name__}")
    return model


def check_elman(model: RNN, what: str) -> RNN:
    """``model`` when its cell is a matrix recurrence s_t = φ(U x_t + W s_{t−1}) (W (H, H), step factors φ'):
    what these Elman diagnostics read; InputError pointing to the any-cell measures otherwise."""
    model = check_model(model)
    W = model.params.get("W")
    if W is None or tuple(W.shape) != (model.hidden_size, model.hidden_size) or not hasattr(model.cell, "factors"):
        raise InputError(
            f"{what} reads the rnn cell's W (H, H) and step factors; this model's cell is {model.cell_name!r}: "
            "gpubptt.diagnostics.gated.cell_flow (gpubptt vanish --cell, or --checkpoint) measures any cell of one "
            "layer and one direction (stacks of other cells are not measured)"
        )
    return model


def check_positive_float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"{name} must be a positive number, got {type(v).__name__} {v!r}")
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name} must be a finite number > 0, got {v}")
    return float(v)


def check_int(v: Any, name: str, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise InputTypeError(f"{name} must be an int ≥ {lo}, got {type(v).__name__} {v!r}")
    if v < lo:
        raise InputError(f"{name} must be an int ≥ {lo}, got {v}")
    return int(v)


def check_list(v: Any, name: str) -> list[Any] | None:
    """``v`` as a list (None as None): InputTypeError naming ``name`` for a single number or anything not iterable
    (a str included), where a list of values is expected."""
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise InputTypeError(f"{name} must be a list of values, got {type(v).__name__} {v!r}")
    return list(v)


def check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"tol must be a number ≥ 0, got {type(tol).__name__} {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise InputError(f"tol must be a finite number ≥ 0, got {tol}")
    return float(tol)


def batch_of(model: RNN, x: Any, y: Any, s0: Any) -> Batch:
    """Validate x (and y, s0) against the model before any work; T ≥ 1 and B ≥ 1; one recurrence."""
    if model.num_states > 1:
        raise InputError(
            f"this diagnostic measures one recurrence; the model has {model.num_states} (num_layers="
            f"{model.num_layers}, bidirectional={model.bidirectional}): use diagnostics.stack_report, "
            "which measures each of them and the products through the stack"
        )
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


def plain_copy(model: RNN) -> RNN:
    """The model's parameters in a fresh model that reads x time-major (T, B, …) under the per-step softmax head,
    without dropout: what the states and step factors of these diagnostics assume, whatever the model's
    ``batch_first``, ``head`` and ``dropout`` say (``loss_and_grads`` and ``model.states`` would swap axes).
    It runs as the model does (``model.to``: its backend, precision included, and run settings)."""
    copy = model.to(model.backend)
    copy.head, copy.batch_first, copy.dropout = "softmax", False, 0.0
    return copy


def states_of(model: RNN, batch: Batch) -> Any:
    """The model's own forward recurrence: S (T+1, B, H) with S[0] = s0 (s_{−1}) and S[t+1] = s_t, time-major
    whatever the model's ``batch_first`` (the batch is checked and time-major already)."""
    return model._states(batch)


def direct_terms(model: RNN, batch: Batch, S: Any) -> Any:
    """The direct term ∂E_t/∂s_t = do_t @ V for every t, with do_t = ŷ_t − onehot(y_t): (T, B, H)."""
    xp = model.backend.xp
    probs = softmax_probs(S[1:], model.params["V"], model.params.get("c"), be=model.backend)  # (T, B, K)
    T, B, K = probs.shape
    do = probs.reshape(T * B, K).copy()  # (T·B, K)
    do[xp.arange(T * B), batch.y.reshape(-1)] -= 1  # backprop through softmax + cross-entropy
    return (do @ model.params["V"]).reshape(T, B, -1)


def factors_of(model: RNN, S: Any) -> Any:
    """The cell's step factors f_t (tanh: 1 − s_t²) for t = 0..T−1, (T, B, H): ∂s_t/∂s_{t−1} = diag(f_t) W."""
    return model.cell.factors(S, be=model.backend, out=model.backend.xp.empty_like(S[1:]))


def to_host(a: Any) -> np.ndarray:
    return to_numpy(a).astype(np.float64)
