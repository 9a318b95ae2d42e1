"""PyTorch interchange without importing torch: ``nn.RNN`` + ``nn.Linear`` state dicts to a model and back.

    torch                       gpubptt
    rnn.weight_ih_l0 (H, D)     U
    rnn.weight_hh_l0 (H, H)     W
    rnn.bias_ih_l0 (H,)  ┐      b = bias_ih_l0 + bias_hh_l0 (the loss depends on their sum only)
    rnn.bias_hh_l0 (H,)  ┘
    linear.weight (K, H)        V
    linear.bias (K,)            c

gpubptt's model has both biases or neither: where torch has one and not the other, the missing
one is zero (the same function). Going back, ``to_torch`` puts b in ``bias_ih_l0`` and zeros in
``bias_hh_l0``; gradients put db in both (each of torch's biases receives the gradient of their
sum). Values may be torch tensors (on any device) or arrays; the result holds NumPy arrays, which
``load_state_dict`` takes after ``torch.as_tensor``. This version builds one layer, one direction:
state dicts of deeper or bidirectional ``nn.RNN`` are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError

__all__ = ["from_torch_state", "to_torch_state"]

_RNN_KEYS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
_LINEAR_KEYS = ("weight", "bias")


def _host(value: Any, key: str) -> np.ndarray:
    """A tensor (any device) or array as a NumPy array, without importing torch."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    elif hasattr(value, "get") and type(value).__module__.split(".")[0] == "cupy":
        value = value.get()
    a = np.asarray(value)
    if a.dtype.kind != "f":
        raise InputTypeError(f"state dict entry {key!r} must hold floats, got dtype {a.dtype}")
    return a


def _check_keys(sd: Any, allowed: tuple[str, ...], required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    if not isinstance(sd, Mapping):
        raise InputTypeError(f"{what} must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    keys = set(sd)
    deeper = sorted(k for k in keys if k.endswith("_reverse") or any(k.endswith(f"_l{i}") for i in range(1, 100)))
    if deeper:
        raise InputError(
            f"{what} has {deeper[0]!r}: a deeper or bidirectional nn.RNN; this gpubptt builds one layer, one direction"
        )
    extra = sorted(keys - set(allowed))
    if extra:
        raise InputError(f"{what} has unexpected key {extra[0]!r}; expected {', '.join(allowed)}")
    missing = [k for k in required if k not in keys]
    if missing:
        raise InputError(f"{what} is missing {missing[0]!r}; expected {', '.join(required)}")
    return {k: _host(v, k) for k, v in sd.items()}


def from_torch_state(rnn_state_dict: Any, linear_state_dict: Any) -> dict[str, np.ndarray]:
    """The parameters U, W, V (and b, c) of gpubptt's model from ``nn.RNN(D, H)`` and ``nn.Linear(H, K)`` state dicts.

    Shapes as in the table of this module; ShapeError or InputError naming the key on any mismatch.
    """
    rnn = _check_keys(rnn_state_dict, _RNN_KEYS, ("weight_ih_l0", "weight_hh_l0"), "the nn.RNN state dict")
    lin = _check_keys(linear_state_dict, _LINEAR_KEYS, ("weight",), "the nn.Linear state dict")
    if ("bias_ih_l0" in rnn) != ("bias_hh_l0" in rnn):
        raise InputError("the nn.RNN state dict must hold both bias_ih_l0 and bias_hh_l0, or neither")
    U, W, V = rnn["weight_ih_l0"], rnn["weight_hh_l0"], lin["weight"]
    if U.ndim != 2:
        raise ShapeError(f"weight_ih_l0 must be 2-d (H, D), got shape {U.shape}")
    H, D = U.shape
    expected = {"weight_ih_l0": (H, D), "weight_hh_l0": (H, H), "bias_ih_l0": (H,), "bias_hh_l0": (H,)}
    for k, a in rnn.items():
        if a.shape != expected[k]:
            raise ShapeError(f"{k} must have shape {expected[k]} (H = {H} from weight_ih_l0), got {a.shape}")
    if V.ndim != 2 or V.shape[1] != H:
        raise ShapeError(f"the nn.Linear weight must have shape (K, {H}) (its input is the RNN's H), got {V.shape}")
    K = V.shape[0]
    if "bias" in lin and lin["bias"].shape != (K,):
        raise ShapeError(f"the nn.Linear bias must have shape ({K},), got {lin['bias'].shape}")
    params = {"U": U, "W": W, "V": V}
    if "bias_ih_l0" in rnn or "bias" in lin:  # both biases or neither: a missing one is zero, the same function
        dtype = np.result_type(U, V)
        params["b"] = rnn["bias_ih_l0"] + rnn["bias_hh_l0"] if "bias_ih_l0" in rnn else np.zeros(H, dtype)
        params["c"] = lin["bias"] if "bias" in lin else np.zeros(K, dtype)
    return params


def to_torch_state(
    params: Mapping[str, Any], *, grads: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(nn.RNN state dict, nn.Linear state dict) of NumPy arrays under torch's names, from U, W, V (b, c).

    ``grads=True`` reads ``params`` as gradients (the keys of ``loss_and_grads``; "s0" ignored): each
    of torch's two biases then receives db.
    """
    host = {k: np.array(_host(v, k)) for k, v in params.items() if k != "s0"}
    rnn = {"weight_ih_l0": host["U"], "weight_hh_l0": host["W"]}
    lin = {"weight": host["V"]}
    if "b" in host:
        rnn["bias_ih_l0"] = host["b"]
        rnn["bias_hh_l0"] = host["b"].copy() if grads else np.zeros_like(host["b"])
        lin["bias"] = host["c"]
    return rnn, lin
