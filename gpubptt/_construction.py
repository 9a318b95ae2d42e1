"""Building a model from arrays or PyTorch state dicts, and writing it back: the constructors of ``RNN``.

``RNN`` inherits these; they live apart from the math (``model.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import interop
from .backend import Backend, get_backend
from .backend.precision import check_precision
from .cells import Cell, cell_class, cell_names, make_cell
from .config import ModelConfig
from .engine.memory import check_model_size
from .errors import InputError, InputTypeError, ShapeError
from .params import Params, architecture_of, param_shapes
from .validation import _cell, _check_layers, _check_seed, cell_option, check_dtype

__all__ = ["Construction"]


#: every model's lock, by id: a child process forked while another thread held one gets fresh ones
_LOCKS: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


def fresh_lock(model: Any) -> None:
    """Give ``model`` its call lock (re-entrant: a locked call may call another), renewed in a forked child."""
    model._lock = threading.RLock()
    _LOCKS[id(model)] = model


def _renew_locks() -> None:
    """In a forked child: the thread that held a model's lock does not exist there, so every lock starts free."""
    for model in list(_LOCKS.values()):
        model._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_locks)


def _cell_of(params: Mapping[str, Any], cell: Any) -> Any:
    """The cell option: ``cell`` as given, or (None) the registered cell whose gates·H matches W's rows (H its
    columns), or without W the first whose own weights are all given; "rnn" when none does (the shape
    checks that follow say what is wrong)."""
    if cell is not None:
        return cell
    if "W" not in params:  # a cell without W (IndRNN's w): the first whose recurrent weights are all there
        for c in cell_names():
            own = set(make_cell(c).param_shapes(1, 1, False)) - {"U"}
            if own and own <= set(params):
                return c
    shape = tuple(getattr(params.get("W"), "shape", ()))
    if len(shape) == 2 and shape[1] > 0:
        for c in cell_names():
            if shape[0] == cell_class(c).gates * shape[1]:
                return c
    return "rnn"


def _other_cell(host: dict[str, np.ndarray], cell: Cell) -> str | None:
    """Why W (rows, H) is another cell's and not ``cell``'s (named by the rows each cell would have); None if not."""
    if "W" not in host or "W" not in cell.param_shapes(1, 1, False):
        return None
    rows, H = host["W"].shape
    gates = {c: cell_class(c).gates for c in cell_names()}
    if rows == cell.gates * H or not any(rows == g * H for g in gates.values()):
        return None
    have = [c for c, g in gates.items() if rows == g * H]
    table = ", ".join(f"{c} {'' if g == 1 else g}H = {g * H}" for c, g in gates.items())
    return (
        f"W has shape {(rows, H)}: {rows} rows for H = {H} is a {have[0]} cell's ({table}), not the "
        f"{cell_option(cell)} cell's {cell.gates}H = {cell.gates * H}; pass cell={have[0]!r}"
    )


def backend_for(backend: str | Backend | None, precision: str | None, dtype: Any) -> Backend:
    """The backend a model runs on: ``backend`` (a name, a Backend or a ``with_precision`` view) at ``precision``
    ("fp32", "tf32", "bf16"; None: a view's own for a float32 model, else "fp32"). InputError for an unknown
    precision, or tf32/bf16 asked of a float64 model."""
    if precision is not None:
        check_precision(precision, dtype)  # before the backend is looked up: a bad value fails first
    be = get_backend(backend)
    if precision is None:
        precision = be.precision if np.dtype(dtype) == np.float32 else "fp32"
    return be.with_precision(check_precision(precision, dtype))


class Construction:
    """``from_params``, ``from_torch``, ``to_torch``, ``to`` and the copies (``copy.deepcopy``, ``pickle``) of a
    model (mixed into ``RNN``)."""

    # -- construction from arrays -------------------------------------------------------------
    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        *,
        backend: str | Backend | None = "auto",
        dtype: Any = None,
        nonlinearity: str | None = None,
        dropout: float = 0.0,
        cell: str | Cell | None = None,
        seed: int | None = None,
        config: ModelConfig | None = None,
        precision: str | None = None,
    ) -> Any:
        """Build a model from arrays (NumPy or backend) named as ``params.param_shapes`` names them.

        With ``config`` (a ``ModelConfig``: what ``to()`` and checkpoints pass) the architecture is the
        config's and nothing is inferred: the arrays must have exactly its names and shapes (``dtype``
        None: the config's; ``cell`` and ``nonlinearity`` must be left unset). Without it:

        One layer: "U" (G·H, D), "W" (G·H, H), "V" (K, H), optionally "b" (G·H,), "c" (K,) (and the GRU's
        "b_hn" (H,)), G the gates of ``cell``: 1 "rnn", 3 "gru", 4 "lstm"; ``cell=None`` reads it from
        W's rows. Layers and directions are read from the names (U_l1, …: ``num_layers``; U_reverse:
        bidirectional); every recurrence's parameters must be there, biases for all or none.
        ``dtype=None`` keeps the arrays' float dtype (float32 or float64). The arrays are copied.
        ``nonlinearity`` "tanh" or "relu" (rnn only); ``dropout`` and ``seed`` (of its masks) as in ``RNN``.
        ``precision`` as in ``RNN`` (None: the backend's, where it is a ``with_precision`` view of a float32 model).
        """
        if not isinstance(params, Mapping):
            raise InputTypeError(f"params must be a mapping of arrays, got {type(params).__name__}")
        if config is not None:
            return cls._from_config(params, config, backend=backend, dtype=dtype, nonlinearity=nonlinearity,
                                    dropout=dropout, cell=cell, seed=seed, precision=precision)  # fmt: skip
        cell = _cell_of(params, cell)
        the_cell = _cell(nonlinearity, cell)
        weights = [k for k in the_cell.param_shapes(1, 1, False) if k != "U"]
        missing = [k for k in ("U", *weights, "V") if k not in params]
        if missing:
            raise InputError(
                f"params is missing {missing}; expected U (G·H, D), {', '.join(weights)} of the "
                f"{cell_option(the_cell)} cell, V (K, H)"
            )
        L, bidirectional = architecture_of(params)
        _, _, dropout = _check_layers(L, bidirectional, dropout)
        check_model_size(the_cell, 1, 1, 1, num_layers=L)  # the same depth limit as RNN (the arrays exist already)
        seed = _check_seed(seed)
        be = get_backend(backend)
        host = {k: be.to_numpy(params[k]) for k in params}
        for k, a in host.items():
            if a.dtype.kind != "f":
                raise InputTypeError(f"parameter {k} must be floating point, got dtype {a.dtype}")
        dt = check_dtype(dtype if dtype is not None else host["U"].dtype)
        be = backend_for(be, precision, dt)
        if host["U"].ndim != 2 or host["V"].ndim != 2:
            raise ShapeError("U, V must be 2-d: got " + ", ".join(f"{k} {host[k].shape}" for k in ("U", "V")))
        if "W" in host and host["W"].ndim != 2:
            raise ShapeError(f"W must be 2-d: got W {host['W'].shape}")
        other = _other_cell(host, the_cell)
        if other is not None:  # another cell's W
            raise ShapeError(other)
        H, D = host["U"].shape[0] // the_cell.gates, host["U"].shape[1]
        K = host["V"].shape[0]
        has_bias = bool((set(the_cell.bias_names()) | {"c"}) & set(host))  # either bias: both are expected
        expected = param_shapes(D, H, K, has_bias, the_cell, num_layers=L, bidirectional=bidirectional)
        unknown = sorted(set(host) - set(expected))
        if unknown:
            arch = f"{L} layer{'s' if L > 1 else ''}{', bidirectional' if bidirectional else ''}"
            raise InputError(
                f"unknown parameter names {unknown} for a model of {arch} (read from the names); "
                f"expected {', '.join(expected)}"
            )
        absent = [k for k in expected if k not in host]
        if absent:
            bias = absent[0][0] in "bc"
            what = "both biases: b (H,) of every recurrence and c (K,), or neither" if bias else "every U and W"
            raise InputError(f"params is missing {absent}; expected {what}")
        for k, a in host.items():
            if a.shape != expected[k]:
                raise ShapeError(
                    f"parameter {k} must have shape {expected[k]} (from U {host['U'].shape}, cell "
                    f"{cell_option(the_cell)!r}), "
                    f"got {a.shape}"
                )
        if min(H, D, K) < 1:
            raise ShapeError(f"every size must be ≥ 1; got D={D}, H={H}, K={K}")
        model = cls.__new__(cls)
        arrays = {k: be.asarray(np.array(host[k])) for k in expected}
        config = ModelConfig(D, H, K, the_cell, L, bidirectional, has_bias, dt)
        model._setup(be, config, arrays)  # Params checks
        model._set_dropout(dropout, seed)
        return model

    @classmethod
    def _from_config(
        cls, params: Mapping[str, Any], config: ModelConfig, *, backend: Any, dtype: Any, nonlinearity: Any,
        dropout: float, cell: Any, seed: Any, precision: str | None = None,
    ) -> Any:  # fmt: skip
        """``from_params`` with the architecture given: every array checked against ``config.param_shapes()``."""
        if not isinstance(config, ModelConfig):
            raise InputTypeError(f"config must be a gpubptt ModelConfig, got {type(config).__name__}")
        if cell is not None or nonlinearity is not None:
            raise InputError(
                "with config=, the cell and its nonlinearity are the config's: leave cell and nonlinearity unset"
            )
        _, _, dropout = _check_layers(config.num_layers, config.bidirectional, dropout)
        seed = _check_seed(seed)
        dt = check_dtype(dtype if dtype is not None else config.dtype)
        config = dataclasses.replace(config, dtype=dt)
        expected = config.param_shapes()
        if set(params) != set(expected):
            raise InputError(
                f"params must hold exactly the config's parameters {', '.join(expected)}; got {', '.join(params)}"
            )
        be = backend_for(backend, precision, dt)
        host = {k: be.to_numpy(params[k]) for k in expected}
        for k, a in host.items():
            if a.dtype.kind != "f":
                raise InputTypeError(f"parameter {k} must be floating point, got dtype {a.dtype}")
            if a.shape != expected[k]:
                raise ShapeError(f"parameter {k} must have shape {expected[k]} (from the config), got {a.shape}")
        model = cls.__new__(cls)
        model._setup(be, config, {k: be.asarray(np.array(a)) for k, a in host.items()})  # Params checks
        model._set_dropout(dropout, seed)
        return model

    @classmethod
    def from_torch(
        cls,
        rnn_state_dict: Mapping[str, Any],
        linear_state_dict: Mapping[str, Any],
        *,
        cell: str = "rnn",
        nonlinearity: str | None = None,
        dropout: float = 0.0,
        backend: str | Backend | None = "auto",
        dtype: Any = None,
        precision: str | None = None,
    ) -> Any:
        """A model from the state dicts of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM(D, H, num_layers, bias,
        bidirectional)`` (``cell`` "rnn", "gru", "lstm") and ``nn.Linear(H·dirs, K, bias)``.

        Sizes, layers, directions and biases are read from the keys and shapes (``gpubptt.interop``
        has the table; torch's two biases of a recurrence become their sum b, except the GRU's
        b_hn). A state dict of another cell (weight_hh with 3H or 4H rows where ``cell`` expects
        H, …) is refused, naming the rows. Values: torch tensors or arrays; torch is not imported.
        ``nonlinearity`` (rnn only) and ``dropout`` as the module's (a state dict records neither);
        ``precision`` as in ``RNN``.
        """
        _cell(nonlinearity, cell)
        params = interop.from_torch_state(
            rnn_state_dict, linear_state_dict, cell=cell, dtype=None if dtype is None else check_dtype(dtype)
        )
        return cls.from_params(
            params,
            backend=backend,
            dtype=dtype,
            nonlinearity=nonlinearity,
            dropout=dropout,
            cell=cell,
            precision=precision,
        )

    def to_torch(self, grads: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(rnn_state_dict, linear_state_dict) of NumPy arrays under torch's names: the weights, or ``grads``.

        For ``nn.RNN(D, H, num_layers, bias=self.bias, bidirectional=…, nonlinearity=…)`` (``nn.GRU``,
        ``nn.LSTM`` for those cells) and ``nn.Linear(H·dirs, K, bias=self.bias)``:
        ``load_state_dict({k: torch.as_tensor(v) ...})``. Each b goes to bias_ih and zeros to bias_hh
        (the GRU's b_hn to the n third of bias_hh); with ``grads`` (as ``loss_and_grads`` returns them)
        both get db.
        """
        cell = cell_option(self.cell)
        interop.torch_cell(cell)  # refused, before any work, for a cell torch has no module for
        if grads is None:
            with self._lock:  # copies of the parameters between two optimizer steps (the step commits under it)
                return interop.to_torch_state(self.params, cell=cell)
        self._check_grads(grads)
        return interop.to_torch_state({k: grads[k] for k in self.params}, grads=True, cell=cell)

    def _check_grads(self, grads: Any) -> None:
        """InputError naming the key or shape unless ``grads`` maps every parameter to an array of its shape."""
        expected = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.params.items())
        if not isinstance(grads, Mapping):
            raise InputTypeError(
                f"grads must be a mapping of parameter names to arrays as loss_and_grads returns it "
                f"({expected}), got {type(grads).__name__}"
            )
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise InputError(f"grads is missing {missing}; expected a gradient for every parameter: {expected}")
        unknown = sorted(str(k) for k in grads if k not in self.params and k not in ("s0", "c0"))
        if unknown:
            raise InputError(f"grads has unknown keys {unknown}; expected {expected} (and s0, c0)")
        for k, p in self.params.items():
            shape = getattr(grads[k], "shape", None)
            if shape is None:
                raise InputTypeError(
                    f"gradient {k} must be an array of shape {tuple(p.shape)}, got {type(grads[k]).__name__}"
                )
            if tuple(shape) != tuple(p.shape):
                raise ShapeError(f"gradient {k} has shape {tuple(shape)}, expected {tuple(p.shape)} like the parameter")

    def to(self, backend: str | Backend) -> Any:
        """A copy of this model on another backend (same dtype, weights and settings, precision included; a
        ``Backend.with_precision`` view given as ``backend`` brings its own precision)."""
        view = isinstance(backend, Backend) and backend.exact is not backend
        precision = backend.precision if view else self.precision
        with self._lock:  # the parameters between two optimizer steps (the step commits under the lock)
            copy = type(self).from_params(
                self.params, backend=backend, dropout=self.dropout, config=self.config, precision=precision
            )
        copy.init, copy.use_graphs = self.init, self.use_graphs
        copy.step_kernels, copy.chunk_elements = self.step_kernels, self.chunk_elements
        copy.head, copy.batch_first = self.head, self.batch_first  # how it reads its inputs and scores its outputs
        return copy

    # -- copies: copy.deepcopy and pickle ------------------------------------------------------
    _TRANSIENT = ("_lock", "_workspaces", "_spares", "backend", "_params", "_dropout_rng", "_param_names")

    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` keep: every setting, the backend's name and the parameters
        as host NumPy arrays (a CuPy model's too: it is rebuilt on the current device). The lock and the
        cached workspaces (CUDA graphs included) are not copied but rebuilt empty; the dropout
        generator travels where it is NumPy's and is reseeded from fresh entropy otherwise."""
        with self._lock:  # not in the middle of another thread's update
            state = {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT}
            state["backend"] = self.backend.name
            state["precision"] = self.backend.precision
            state["_params"] = {k: np.array(self.backend.to_numpy(v)) for k, v in self._params.items()}
            state["_param_shapes"] = {k: tuple(v.shape) for k, v in self._params.items()}
            rng = self._dropout_rng
            state["_dropout_rng"] = rng if isinstance(rng, np.random.Generator) else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "dropout" in state:  # pickled before dropout became a checked property
            state["_dropout"] = state.pop("dropout")
        if "config" in state:  # pickled while the architecture was plain attributes: the config holds it all
            state["_config"] = state.pop("config")
            for name in ("dtype", "cell", "num_layers", "bidirectional", "recurrences"):
                state.pop(name, None)
        state["_recurrences"] = tuple(state["_config"].recurrences)
        for name, default in (("batch_first", False), ("use_graphs", True)):  # plain attributes when pickled before
            state.setdefault(f"_{name}", state.pop(name, default))  # they became checked properties (or existed)
        be = get_backend(state.pop("backend")).with_precision(state.pop("precision", "fp32"))
        host, shapes, rng = state.pop("_params"), state.pop("_param_shapes"), state.pop("_dropout_rng")
        self.__dict__.update(state)
        self.backend = be
        self._params = Params(be, self.dtype, shapes, {k: be.asarray(v) for k, v in host.items()})
        self._workspaces = {}
        self._spares = {}
        self._param_names = {}  # made again on first use (a copy pickled before it existed has none)
        fresh_lock(self)
        self._dropout_rng = be.random_generator(None) if rng is None else rng

    def __deepcopy__(self, memo: dict) -> Any:
        """An independent model, equal in parameters and settings (see ``__getstate__``)."""
        new = type(self).__new__(type(self))
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    def __copy__(self) -> Any:
        """``copy.copy`` is ``copy.deepcopy``: the parameters are copied either way, and a shallow copy would share
        the dropout generator (a call on one model changing the other's masks)."""
        return self.__deepcopy__({})


def cell_repr(model: Any) -> str:
    """The repr's cell part, what rebuilds the cell: nothing for the default rnn/tanh, ``cell=`` the option name
    and ``nonlinearity=`` where they say it all, else ``cell=`` the cell object's repr (its options)."""
    name = "" if model.cell_name == "rnn" else f", cell={model.cell_name!r}"
    try:
        plain = make_cell(model.cell_name)  # the option's defaults
    except Exception:  # a cell that needs its options (or whose class misbehaves): say the cell itself
        plain = None
    if plain is not None and model.cell == plain:
        return name
    if plain is not None and model.cell.options() == {**plain.options(), "nonlinearity": model.nonlinearity}:
        return f"{name}, nonlinearity={model.nonlinearity!r}"
    return f", cell={model.cell!r}"
