"""The model's options, checked before any work: reduction, truncate, layers, seeds, and the choice of cell
(``cell`` and ``nonlinearity``, an LSTM's tuple state, which cell a weight's rows belong to).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._checks import check_positive_int
from .cells import NONLINEARITIES, ElmanCell, GRUCell, LSTMCell
from .errors import InputError, InputTypeError

__all__ = ["CELLS", "GATES", "INITS", "REDUCTIONS", "cell_option", "make_cell"]

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


#: The cells: "rnn" (torch.nn.RNN's Elman cell), "gru" (torch.nn.GRU's), "lstm" (torch.nn.LSTM's).
CELLS = ("rnn", "gru", "lstm")
#: rows of U and W per hidden unit, by cell: what tells one cell's parameters from another's
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
_TORCH_NAME = {"rnn": "nn.RNN", "gru": "nn.GRU", "lstm": "nn.LSTM"}


def _cell(nonlinearity: Any, cell: Any = "rnn") -> ElmanCell | GRUCell | LSTMCell:
    if not isinstance(cell, str) or cell not in CELLS:
        raise InputError(f"unknown cell {cell!r}; expected one of {', '.join(CELLS)} (torch.nn.RNN, GRU, LSTM)")
    if cell != "rnn":
        if nonlinearity is not None:
            raise InputError(
                f"nonlinearity applies to cell='rnn' only; the {cell.upper()}'s gates use σ and tanh as "
                f"torch.{_TORCH_NAME[cell]}'s (leave nonlinearity unset), got nonlinearity={nonlinearity!r}"
            )
        return GRUCell() if cell == "gru" else LSTMCell()
    nonlinearity = "tanh" if nonlinearity is None else nonlinearity
    if nonlinearity not in NONLINEARITIES:
        raise InputError(f"unknown nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")
    return ElmanCell(nonlinearity)


def make_cell(cell: str = "rnn", nonlinearity: str | None = None) -> ElmanCell | GRUCell | LSTMCell:
    """The cell object of the ``cell`` option ("rnn", "gru", "lstm"); InputError on a bad pair (as ``RNN``)."""
    return _cell(nonlinearity, cell)


def cell_option(cell: Any) -> str:
    """The ``cell=`` option ("rnn", "gru", "lstm") of a cell object (the Elman cell's name is "elman")."""
    return "rnn" if cell.name == "elman" else cell.name


def _split_state(s0: Any, cell: Any) -> tuple[Any, Any]:
    """(h0, c0) from an LSTM's tuple s0, (s0, None) for the other cells; InputError on the wrong form."""
    if not getattr(cell, "extra_state", False):
        if isinstance(s0, tuple):
            raise InputError(
                f"s0 is a tuple of {len(s0)}, but only cell='lstm' has a tuple state (h0, c0); the {cell_option(cell)} "
                "cell's s0 is one array (B, H) or (L·dirs, B, H)"
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


def _gates_message(name: str, shape: tuple[int, ...], cell: str) -> str:
    """Why a weight of ``shape`` (rows, H) does not belong to ``cell``: the rows each cell would have."""
    rows, H = shape
    have = [c for c, g in GATES.items() if rows == g * H]
    mine = f"a {have[0]} cell's" if have else "no cell's"
    return (
        f"{name} has shape {shape}: {rows} rows for H = {H} is {mine} (rnn H = {H}, gru 3H = {3 * H}, "
        f"lstm 4H = {4 * H}), not the {cell} cell's {GATES[cell]}H = {GATES[cell] * H}"
        + (f"; pass cell={have[0]!r}" if have else "")
    )


def _cell_of(W: Any, cell: str | None) -> str:
    """The cell option: ``cell`` as given, or (None) the one whose gates·H matches W's rows (H = its columns)."""
    if cell is not None:
        return cell
    shape = tuple(getattr(W, "shape", ()))
    if len(shape) == 2 and shape[1] > 0:
        for c, g in GATES.items():
            if shape[0] == g * shape[1]:
                return c
    return "rnn"  # the shape checks that follow say what is wrong
