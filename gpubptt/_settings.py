"""A model's settings, mixed into ``RNN``: its sizes and cell read from the architecture (``model.config``),
the GEMMs' operand precision, a runtime choice like the backend, and the checked run settings (dropout,
batch_first, use_graphs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend.precision import check_precision
from .errors import ShapeError
from .validation import cell_option, check_bool, check_dropout

__all__ = ["Settings"]


class _FromConfig:
    """A read-only attribute of the model that its architecture holds: ``model.<name>`` is ``model.config.<name>``;
    setting or deleting it raises AttributeError (``_read_only``)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.__doc__ = name, doc

    def __get__(self, model: Any, owner: Any = None) -> Any:
        return self if model is None else getattr(model._config, self.name)

    def __set__(self, model: Any, value: Any) -> None:
        _read_only(self.name)

    def __delete__(self, model: Any) -> None:
        _read_only(self.name)


class Settings:
    """The read-only architecture (``config`` and what reads from it: ``cell``, ``dtype``, ``num_layers``, sizes, …,
    ``num_states``) and the settable, checked ``precision``, ``dropout``, ``batch_first`` and ``use_graphs`` (mixed into
    ``RNN``)."""

    @property
    def use_graphs(self) -> bool:
        """On CuPy, record forward+BPTT once per shape as a CUDA graph and replay it (no effect on NumPy); a bool
        (checked)."""
        return self._use_graphs

    @use_graphs.setter
    def use_graphs(self, value: Any) -> None:
        self._use_graphs = check_bool(value, "use_graphs")

    @property
    def batch_first(self) -> bool:
        """As torch's: x (B, T, …), per-step targets (B, T[, K]) and per-step outputs and states (B, T, …) with the
        batch first (views where possible); s0, lengths and final states are unchanged. Set it to a bool (checked)."""
        return self._batch_first

    @batch_first.setter
    def batch_first(self, value: Any) -> None:
        self._batch_first = check_bool(value, "batch_first")

    def _swap(self, a: Any, what: str) -> Any:
        """With ``batch_first``: a (B, T, …) → (T, B, …) as a view (after the backend check)."""
        if not self.batch_first or a is None:
            return a
        self.backend.check_native(a, what)
        a = self.backend.asarray(a)
        if a.ndim < 2:
            raise ShapeError(f"with batch_first, {what} must be (B, T, …); got shape {tuple(a.shape)}")
        return a.swapaxes(0, 1)

    def _swap_targets(self, y: Any, x: Any) -> Any:
        """Per-step targets as ``_swap`` turns them, checked first against x as given (B, T, …) where
        ``batch_first``: a mismatch is named in the caller's layout, not the swapped one."""
        if self.batch_first and y is not None and x is not None:
            ys, xs = (tuple(getattr(a, "shape", None) or np.shape(a)) for a in (y, x))  # lists too
            if len(ys) >= 2 and len(xs) >= 2 and ys[:2] != xs[:2]:
                raise ShapeError(
                    f"with batch_first, targets y must have shape (B, T, …) = ({xs[0]}, {xs[1]}, …), x's first two "
                    f"sizes; got {ys}"
                )
        return self._swap(y, "y")

    def _out(self, a: Any) -> Any:
        return a.swapaxes(0, 1) if self.batch_first and a is not None else a

    @property
    def dropout(self) -> float:
        """p of the inverted dropout between layers (see the class); set it to any number in [0, 1) (checked)."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: Any) -> None:
        self._dropout = check_dropout(p)

    @property
    def precision(self) -> str:
        """The GEMMs' operand precision: "fp32" (float32 GEMMs), "tf32" or "bf16" (operands rounded to
        nearest even, products accumulated in float32; parameters, cell state, gate math and softmax stay
        float32; ``gpubptt.backend.precision``). Set it on a float32 model; float64 models run "fp32" only.
        On CuPy, tf32/bf16 steps run as cuBLAS GEMMs (``step_kernels`` "auto" means "cublas" then)."""
        return self.backend.precision

    @precision.setter
    def precision(self, value: str) -> None:
        value = check_precision(value, self.dtype)
        with self._lock:  # cached workspaces (and graphs) ran the other precision: rebuilt at the next call
            self.backend = self.backend.with_precision(value)
            self._workspaces.clear()
            self._spares.clear()

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    # -- the architecture (read-only: a model of another architecture is another model) ---------------
    @property
    def config(self) -> Any:
        """The architecture (sizes, cell, layers, directions, bias, dtype): what the model is built from
        (``gpubptt.config.ModelConfig``, frozen). Read-only, as ``cell``, ``dtype``, ``num_layers``,
        ``bidirectional`` and ``recurrences`` read from it: build a new model for another architecture."""
        return self._config

    @config.setter
    def config(self, value: Any) -> None:
        _read_only("config")

    cell = _FromConfig("cell", "The recurrent cell (``gpubptt.cells``), the config's.")
    """The recurrent cell (``gpubptt.cells``), the config's (read-only)."""
    dtype = _FromConfig("dtype", "The parameters' and computations' dtype (float32 or float64), the config's.")
    """The parameters' and computations' dtype (float32 or float64), the config's (read-only)."""
    num_layers = _FromConfig("num_layers", "L, the config's.")
    """L, the config's (read-only)."""
    bidirectional = _FromConfig("bidirectional", "Whether every layer also runs in reverse, the config's.")
    """Whether every layer also runs in reverse, the config's (read-only)."""

    @property
    def recurrences(self) -> tuple[Any, ...]:
        """The recurrences in torch's order (layer by layer, forward before reverse), a tuple."""
        return self._recurrences

    @recurrences.setter
    def recurrences(self, value: Any) -> None:
        _read_only("recurrences")

    # -- sizes --------------------------------------------------------------------------------
    @property
    def nonlinearity(self) -> str | None:
        """φ of the rnn cell's recurrence: "tanh" or "relu"; None for the gated cells."""
        return self.cell.nonlinearity

    @property
    def cell_name(self) -> str:
        """The ``cell`` option: "rnn", "gru" or "lstm"."""
        return cell_option(self.cell)

    @property
    def input_size(self) -> int:
        """D."""
        return self.config.input_size

    @property
    def hidden_size(self) -> int:
        """H."""
        return self.config.hidden_size

    @property
    def output_size(self) -> int:
        """K."""
        return self.config.output_size

    @property
    def bias(self) -> bool:
        """Whether the model has biases b and c."""
        return self.config.bias

    @property
    def num_states(self) -> int:
        """L·dirs: the recurrences, the rows of s0 and of the final state."""
        return len(self.recurrences)


def _read_only(name: str) -> None:
    """AttributeError for a write to a part of the architecture: the parameters were built for it, so a file saved
    or a call made after the change would not match them."""
    raise AttributeError(
        f"{name} is part of the model's architecture (model.config) and cannot be set: the parameters were built for "
        "it; build a new model for another one (gpubptt.RNN(...), or RNN.from_params(params, config=...))"
    )
