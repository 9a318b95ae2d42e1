"""The model's options, checked before any work: reduction, truncate, layers, seeds, and the choice of cell
(``cell`` and ``nonlinearity`` through the cell registry, a tuple state of a cell that carries one).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._checks import check_positive_int
from .cells import Cell, cell_class, cell_names, make_cell
from .errors import InputError, InputTypeError

__all__ = ["CELLS", "INITS", "REDUCTIONS", "cell_option", "make_cell"]

INITS = ("wildml", "torch")
REDUCTIONS = ("sum", "mean")


def _check_reduction(reduction: Any) -> str:
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; expected one of {', '.join(REDUCTIONS)}")
    return reduction


def _check_truncate(truncate: Any) -> int | None:
    if truncate is None:
        return None
    if isinstance(truncate, bool) or not isinstance(truncate, (int, np.integer)):
        raise InputTypeError(f"truncate must be None or an int ≥ 0, got {type(truncate).__name__} {truncate!r}")
    if truncate < 0:
        raise InputError(f"truncate must be None or an int ≥ 0, got {truncate}")
    return int(truncate)


#: The cells registered when gpubptt was imported ("rnn", "gru", "lstm", "indrnn"); ``cell_names()`` is the
#: live list (a cell registered later, ``gpubptt.cells.register_cell``, is in it).
CELLS = cell_names()


def _cell(nonlinearity: Any, cell: Any = "rnn", **options: Any) -> Cell:
    return make_cell(cell, nonlinearity, **options)


def cell_option(cell: Any) -> str:
    """The ``cell=`` option ("rnn", "gru", "lstm", …) of a cell object (the Elman cell's ``name`` is "elman")."""
    return cell.option


def _split_state(s0: Any, cell: Any) -> tuple[Any, Any]:
    """(h0, c0) from an LSTM's tuple s0, (s0, None) for the other cells; InputError on the wrong form."""
    if not getattr(cell, "extra_state", False):
        if isinstance(s0, tuple):
            tupled = "|".join(repr(c) for c in cell_names() if cell_class(c).extra_state)
            raise InputError(
                f"s0 is a tuple of {len(s0)}, but only cell={tupled} has a tuple state (h0, c0); the "
                f"{cell_option(cell)} cell's s0 is one array (B, H) or (L·dirs, B, H)"
            )
        return s0, None
    if s0 is None:
        return None, None
    if not isinstance(s0, tuple) or len(s0) != 2 or s0[0] is None or s0[1] is None:
        got = f"a tuple of {len(s0)}" if isinstance(s0, tuple) else type(s0).__name__
        raise InputError(
            f"an LSTM's s0 is the tuple (h0, c0), as torch.nn.LSTM's hx, each (B, H) or (L·dirs, B, H); got {got}"
            " (for c0 = 0 give (h0, zeros like h0))"
        )
    return s0


def _check_layers(num_layers: Any, bidirectional: Any, dropout: Any) -> tuple[int, bool, float]:
    L = check_positive_int(num_layers, "num_layers")
    if not isinstance(bidirectional, (bool, np.bool_)):
        raise InputTypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__} {bidirectional!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"dropout must be a number in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0 <= dropout < 1:  # also refuses NaN
        raise InputError(f"dropout must lie in [0, 1) (the probability of zeroing a layer's output), got {dropout}")
    if dropout > 0 and L == 1:
        warnings.warn(
            f"dropout={dropout} has no effect with num_layers=1: as in torch.nn.RNN, it applies to the outputs "
            "of every layer but the last",
            UserWarning,
            stacklevel=3,
        )
    return L, bool(bidirectional), float(dropout)


def _check_seed(seed: Any, name: str = "seed") -> int | None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise InputError(f"{name} must be None or an int ≥ 0, got {type(seed).__name__} {seed!r}")
    return None if seed is None else int(seed)
