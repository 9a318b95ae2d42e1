"""The model's architecture record: sizes, cell (with its options), layers, directions, bias, dtype.

    >>> import gpubptt
    >>> cfg = gpubptt.RNN(8, 16, 8, cell="gru", backend="numpy").config
    >>> cfg.hidden_size, cfg.cell.option, cfg.param_shapes()["W"]
    (16, 'gru', (48, 16))

``RNN``, ``from_params``, ``from_torch``, ``to()`` and checkpoints build a model from one of these;
sizes are never read back from parameter names or shapes. Checked once, when built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .cells import Cell
from .errors import InputError, InputTypeError
from .params import param_shapes, recurrences
from .validation import check_dtype, check_positive_int

__all__ = ["ModelConfig"]

_FLOAT32 = np.dtype("float32")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of an ``RNN``: D, H, K, the cell object, num_layers, bidirectional, bias, dtype.

    ``param_shapes()`` is the model's schema {name: shape} (``params.param_shapes``); ``recurrences``
    the stack's recurrences in torch's order.
    """

    input_size: int
    hidden_size: int
    output_size: int
    cell: Cell
    num_layers: int = 1
    bidirectional: bool = False
    bias: bool = True  # as RNN(bias=...)
    dtype: np.dtype = _FLOAT32

    def __post_init__(self) -> None:
        """Every field checked (InputError/InputTypeError naming it), sizes as Python ints, dtype as np.dtype."""
        for name in ("input_size", "hidden_size", "output_size", "num_layers"):
            object.__setattr__(self, name, check_positive_int(getattr(self, name), f"ModelConfig.{name}"))
        for name in ("bidirectional", "bias"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise InputTypeError(f"ModelConfig.{name} must be a bool, got {type(v).__name__} {v!r}")
            object.__setattr__(self, name, bool(v))
        if not isinstance(self.cell, Cell):
            raise InputTypeError(
                f"ModelConfig.cell must be a cell object (gpubptt.cells.make_cell('gru'), ...), got "
                f"{type(self.cell).__name__} {self.cell!r}"
            )
        try:
            if self.dtype is None:  # np.dtype(None) is float64
                raise InputError("no dtype")
            dtype = check_dtype(self.dtype)
        except (InputError, ValueError):
            raise InputError(f"ModelConfig.dtype must be float32 or float64, got {self.dtype!r}") from None
        object.__setattr__(self, "dtype", dtype)

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional stack, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def recurrences(self) -> list[Any]:
        """The recurrences in torch's order (layer by layer, forward before reverse)."""
        return recurrences(self.num_layers, self.bidirectional)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of every parameter, in the model's order."""
        return param_shapes(
            self.input_size, self.hidden_size, self.output_size, self.bias, self.cell,
            num_layers=self.num_layers, bidirectional=self.bidirectional,
        )  # fmt: skip
