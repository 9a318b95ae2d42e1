"""PyTorch interchange without importing torch: ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` + ``nn.Linear`` state
dicts to a model and back.

    torch                                  gpubptt
    rnn.weight_ih_l0 (H, D)                U
    rnn.weight_hh_l0 (H, H)                W
    rnn.bias_ih_l0 (H,)  ┐                 b = bias_ih_l0 + bias_hh_l0 (the loss depends on their sum only)
    rnn.bias_hh_l0 (H,)  ┘
    rnn.weight_ih_l{k}{_reverse} (H, H·dirs for k ≥ 1)  U_l{k}{_reverse} (no "_l0": layer 0 is U, U_reverse)
    rnn.weight_hh_l{k}{_reverse} (H, H)    W_l{k}{_reverse}, and biases alike
    linear.weight (K, H·dirs)              V
    linear.bias (K,)                       c

The gated cells keep torch's gate order in the rows (G = 3 for the GRU, r z n; 4 for the LSTM,
i f g o): weight_ih (G·H, D), weight_hh (G·H, H), biases (G·H,). The LSTM's b is again the sum of
its two biases; the GRU's b is bias_ih plus the r and z thirds of bias_hh, and the n third of
bias_hh is b_hn (H,), which sits inside r ⊙ (W_hn h + b_hn) and does not fold. H is read from
weight_hh_l0's columns; a state dict whose rows say another cell (3H rows for an nn.RNN) is refused.

Layers and directions are read from the keys. gpubptt's model has all biases or none: where torch
has the RNN's and not the Linear's (or the reverse), the missing ones are zero (the same
function). Going back, ``to_torch`` puts each b in ``bias_ih`` and zeros in ``bias_hh`` (the GRU's
b_hn in bias_hh's n third); gradients put db in both (each of torch's biases receives the gradient
of their sum). Values may be torch tensors (on any device; bfloat16, which has no NumPy dtype, is widened
exactly to float32) or arrays; the result holds NumPy arrays, which ``load_state_dict`` takes after
``torch.as_tensor``. Keys are torch's exactly: ``weight_hh_l00`` is refused, not read as layer 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .cells import cell_class, cell_names
from .errors import InputError, InputTypeError, ShapeError
from .params import architecture_of, param_shapes, recurrences
from .validation import check_bool

__all__ = ["from_torch_state", "to_torch_state"]

_LINEAR_KEYS = ("weight", "bias")
_KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh)_l(0|[1-9][0-9]*)(_reverse)?$")  # torch's: no "l00"
_TO_OURS = {"weight_ih": "U", "weight_hh": "W"}


def _torch_cells() -> dict[str, Any]:
    """The registered cells that declare a torch module, by option name (their gates and module from the cell)."""
    return {c: cell_class(c) for c in cell_names() if cell_class(c).torch_module}


def _rows(gates: dict[str, int]) -> str:
    """ "rnn H, gru 3H, lstm 4H": the rows of W per cell."""
    return ", ".join(f"{c} {'' if g == 1 else g}H" for c, g in gates.items())


def torch_cell(cell: str) -> Any:
    """The cell class of ``cell`` when it has a torch module; InputError refusing interchange otherwise."""
    cls = cell_class(cell)
    if cls.torch_module is None:
        have = ", ".join(f"{c} ({k.torch_module})" for c, k in _torch_cells().items())
        raise InputError(
            f"cell {cell!r} has no torch module (torch.nn has no such layer), so its parameters have no torch "
            f"state dict; torch interchange applies to {have}"
        )
    return cls


def check_has_data(tensor: Any, key: str) -> None:
    """InputTypeError naming ``key`` for a torch tensor with no values to read: on the meta device, a lazy module's
    uninitialized parameter, or not dense (sparse layouts)."""
    if getattr(tensor, "is_meta", False) or type(tensor).__name__.startswith("Uninitialized"):
        raise InputTypeError(
            f"{key} holds no values (a tensor on the meta device, or a lazy module's uninitialized parameter): load "
            "or materialise the weights first"
        )
    layout = str(getattr(tensor, "layout", "torch.strided"))
    if layout != "torch.strided":
        raise InputTypeError(f"{key} is a {layout} tensor; expected a dense one (.to_dense())")


def _host(value: Any, key: str) -> np.ndarray:
    """A tensor (any device) or array as a NumPy array, without importing torch."""
    if hasattr(value, "detach"):  # a torch tensor
        check_has_data(value, key)
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":  # no NumPy dtype: widen, exactly, to float32
            value = value.float()
        value = value.numpy()
    elif hasattr(value, "get") and type(value).__module__.split(".")[0] == "cupy":
        value = value.get()
    a = np.asarray(value)
    if a.dtype.kind != "f":
        raise InputTypeError(f"state dict entry {key!r} must hold floats, got dtype {a.dtype}")
    return a


def _mapping(sd: Any, what: str) -> Mapping:
    if not isinstance(sd, Mapping):
        raise InputTypeError(f"{what} must be a state dict (a mapping of names to tensors), got {type(sd).__name__}")
    return sd


def _rnn_keys(num_layers: int, bidirectional: bool, bias: bool) -> list[str]:
    keys = []
    for r in recurrences(num_layers, bidirectional):
        sfx = f"_l{r.layer}" + ("_reverse" if r.direction else "")
        keys += [f"weight_ih{sfx}", f"weight_hh{sfx}"] + ([f"bias_ih{sfx}", f"bias_hh{sfx}"] if bias else [])
    return keys


def from_torch_state(
    rnn_state_dict: Any, linear_state_dict: Any, *, cell: str = "rnn", dtype: Any = None
) -> dict[str, np.ndarray]:
    """gpubptt's parameters (U, W, V, …; b, c; the GRU's b_hn) from ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM(D, H,
    num_layers, bias, bidirectional)`` (``cell`` "rnn", "gru", "lstm") and ``nn.Linear(H·dirs, K)`` state dicts.
    ``dtype``: the dtype the parameters are for (None: the state dict's): torch's two biases of a recurrence are
    added exactly and rounded once to it, so a float64 model of a float32 module is ``module.double()``'s function.

    Shapes as in the table of this module; ShapeError or InputError naming the key on any mismatch.
    """
    cls = torch_cell(cell)
    G, gates, module = cls.gates, {c: k.gates for c, k in _torch_cells().items()}, cls.torch_module
    b_hn = "b_hn" in cls().param_shapes(1, 1, True)  # a GRU's: inside r ⊙ (·), it does not fold into b
    rnn_sd = _mapping(rnn_state_dict, f"the {module} state dict")
    lin_sd = _mapping(linear_state_dict, "the nn.Linear state dict")
    parsed = {}
    for k in rnn_sd:
        m = _KEY.match(str(k))
        if m is None:
            raise InputError(
                f"the {module} state dict has unexpected key {k!r}; expected weight_ih_l0, weight_hh_l0, "
                f"bias_ih_l0, bias_hh_l0 (and _l1, …, _reverse for deeper or bidirectional {module})"
            )
        parsed[k] = (m.group(1), int(m.group(2)), m.group(3) is not None)
    for k in ("weight_ih_l0", "weight_hh_l0"):
        if k not in rnn_sd:
            raise InputError(f"the {module} state dict is missing {k!r}; expected weight_ih_l0, weight_hh_l0")
    num_layers = 1 + max(layer for _, layer, _ in parsed.values())
    bidirectional = any(rev for _, _, rev in parsed.values())
    bias = any(kind.startswith("bias") for kind, _, _ in parsed.values())
    expected = _rnn_keys(num_layers, bidirectional, bias)
    arch = f"{num_layers} layer{'s' if num_layers > 1 else ''}{', bidirectional' if bidirectional else ''}"
    for k in expected:
        if k not in rnn_sd:
            if k.startswith("bias"):
                why = "biases come for every layer and direction, bias_ih and bias_hh, or not at all"
            else:
                why = f"the keys describe {arch}"
            raise InputError(f"the {module} state dict is missing {k!r} ({why})")
    rnn = {k: _host(v, k) for k, v in rnn_sd.items()}
    for k in _LINEAR_KEYS[:1]:
        if k not in lin_sd:
            raise InputError(f"the nn.Linear state dict is missing {k!r}; expected weight (and bias)")
    extra = sorted(str(k) for k in lin_sd if k not in _LINEAR_KEYS)
    if extra:
        raise InputError(f"the nn.Linear state dict has unexpected key {extra[0]!r}; expected weight, bias")
    lin = {k: _host(v, k) for k, v in lin_sd.items()}
    U0, W0 = rnn["weight_ih_l0"], rnn["weight_hh_l0"]
    if U0.ndim != 2 or W0.ndim != 2:
        raise ShapeError(f"weight_ih_l0 and weight_hh_l0 must be 2-d, got shapes {U0.shape} and {W0.shape}")
    rows, cols = W0.shape
    # another cell's weights (rows not this cell's G·H, but another's): say which, by the rows
    other = [c for c, g in gates.items() if rows == g * cols and c != cell] if rows != G * cols else []
    if other:  # another cell's weights: say which, by the rows
        raise ShapeError(
            f"weight_hh_l0 has {rows} rows for H = {cols} (its columns): the state dict of an "
            f"{cell_class(other[0]).torch_module} (cell={other[0]!r}); the {cell} cell's {module} has "
            f"{'' if G == 1 else G}H = {G * cols} rows ({_rows(gates)})"
        )
    if rows != G * cols:
        raise ShapeError(
            f"weight_hh_l0 must have shape ({'' if G == 1 else G}H, H) in {module} (H its columns), got {W0.shape}"
        )
    H, D = cols, U0.shape[1]  # H from weight_hh_l0's columns (as the module docstring says), D from weight_ih_l0's
    dirs = 2 if bidirectional else 1
    for k, (kind, layer, _) in parsed.items():
        if kind == "weight_ih":
            shape = (G * H, D if layer == 0 else H * dirs)
        else:
            shape = (G * H, H) if kind == "weight_hh" else (G * H,)
        if rnn[k].shape != shape:
            note = f"H = {H} from weight_hh_l0, {module}"
            note += f", {arch}" if num_layers > 1 or bidirectional else ""
            raise ShapeError(f"{k} must have shape {shape} ({note}), got {rnn[k].shape}")
    V = lin["weight"]
    if V.ndim != 2 or V.shape[1] != H * dirs:
        raise ShapeError(
            f"the nn.Linear weight must have shape (K, {H * dirs}) (its input is the RNN's H·dirs), got {V.shape}"
        )
    K = V.shape[0]
    if "bias" in lin and lin["bias"].shape != (K,):
        raise ShapeError(f"the nn.Linear bias must have shape ({K},), got {lin['bias'].shape}")
    for what, sd in (("", rnn), ("the nn.Linear ", lin)):  # named as torch names them, before they are folded
        for k, a in sd.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise InputError(f"{what}{k} contains NaN or infinity")
    weights: dict[str, np.ndarray] = {}
    biases: dict[str, np.ndarray] = {}
    dtype = np.result_type(U0, V) if dtype is None else np.dtype(dtype)

    def total(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # torch's two biases, added exactly, rounded once
        return (a.astype(np.float64) + b.astype(np.float64)).astype(dtype)

    with_bias = bias or "bias" in lin  # all biases or none: a missing one is zero, the same function
    for r in recurrences(num_layers, bidirectional):
        sfx = f"_l{r.layer}" + ("_reverse" if r.direction else "")
        for kind in ("weight_ih", "weight_hh"):
            weights[r.name(_TO_OURS[kind])] = rnn[kind + sfx]
        if with_bias and b_hn:  # b_hn stays inside r ⊙ (·): only the r and z thirds of bias_hh fold
            b_hh = rnn["bias_hh" + sfx] if bias else np.zeros(G * H, dtype)
            b_ih = rnn["bias_ih" + sfx] if bias else np.zeros(G * H, dtype)
            biases[r.name("b")] = np.concatenate([total(b_ih[: 2 * H], b_hh[: 2 * H]), b_ih[2 * H :].astype(dtype)])
            biases[r.name("b_hn")] = b_hh[2 * H :].copy()
        elif with_bias:
            biases[r.name("b")] = total(rnn["bias_ih" + sfx], rnn["bias_hh" + sfx]) if bias else np.zeros(G * H, dtype)
    weights["V"] = V
    if with_bias:
        biases["c"] = lin["bias"] if "bias" in lin else np.zeros(K, dtype)
    return {**weights, **biases}


def to_torch_state(
    params: Mapping[str, Any], *, grads: bool = False, cell: str = "rnn"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(nn.RNN / nn.GRU / nn.LSTM state dict, nn.Linear state dict) of NumPy arrays under torch's names,
    from gpubptt's parameters (``cell`` "rnn", "gru", "lstm").

    Any number of layers and directions (read from the names). ``grads=True`` reads ``params`` as
    gradients (the keys of ``loss_and_grads``; "s0", "c0" ignored): each of torch's two biases then
    receives db (the GRU's bias_hh: [db_r, db_z, db_hn]).
    """
    grads = check_bool(grads, "grads")
    cls = torch_cell(cell)
    b_hn = "b_hn" in cls().param_shapes(1, 1, True)
    params = _mapping(params, "params")
    host = {k: np.array(_host(v, k)) for k, v in params.items() if k not in ("s0", "c0")}
    if not {"U", "W", "V"} <= set(host):
        raise InputError(f"params must hold U, W and V (and every layer's own), got {', '.join(map(str, host))}")
    num_layers, bidirectional = architecture_of(host)
    bias = "b" in host
    U, W, V = host["U"], host["W"], host["V"]
    if W.ndim != 2 or U.ndim != 2 or V.ndim != 2 or W.shape[0] != cls.gates * W.shape[1]:
        raise InputError(
            f"params are not the {cell} cell's: its W is ({'' if cls.gates == 1 else cls.gates}H, H) "
            f"({cls.torch_module}), got W {W.shape}: give cell= the model's cell (model.cell_name)"
        )
    shapes = param_shapes(U.shape[1], W.shape[1], V.shape[0], bias, cls(), num_layers=num_layers,
                          bidirectional=bidirectional)  # fmt: skip
    missing, extra = [k for k in shapes if k not in host], [str(k) for k in host if k not in shapes]
    if missing or extra:
        raise InputError(
            f"params are not the {cell} cell's for {num_layers} layer(s){', bidirectional' if bidirectional else ''}:"
            f"{' missing ' + ', '.join(missing) if missing else ''}{' unexpected ' + ', '.join(extra) if extra else ''}"
            " (another cell's? give cell= the model's cell, model.cell_name)"
        )
    for k, shape in shapes.items():
        if host[k].shape != shape:
            raise ShapeError(f"parameter {k} must have shape {shape} (the {cell} cell's, from U, W, V), got "
                             f"{host[k].shape}")  # fmt: skip
    rnn: dict[str, np.ndarray] = {}
    for r in recurrences(num_layers, bidirectional):
        sfx = f"_l{r.layer}" + ("_reverse" if r.direction else "")
        rnn["weight_ih" + sfx] = host[r.name("U")]
        rnn["weight_hh" + sfx] = host[r.name("W")]
        if r.name("b") in host:
            b = host[r.name("b")]
            rnn["bias_ih" + sfx] = b
            rnn["bias_hh" + sfx] = b.copy() if grads else np.zeros_like(b)
            if b_hn:  # the n third of bias_hh is b_hn; bias_ih's n third is b's alone
                H = b.shape[0] // 3
                rnn["bias_hh" + sfx][2 * H :] = host[r.name("b_hn")]
    lin = {"weight": host["V"]}
    if "c" in host:
        lin["bias"] = host["c"]
    return rnn, lin
