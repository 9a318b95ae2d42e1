"""Input and option validation: every check runs before any work, and names what was wrong and what was expected.

Range checks are computed as reductions on the device and read back in one transfer, never by
relying on indexing to raise: CuPy wraps out-of-range indices. (``lengths``, B integers, are read
back on their own: the mask and the count of counted steps are built on the host.) The model's options
(reduction, truncate, layers, seeds, and the choice of cell: ``cell`` and ``nonlinearity`` through the cell
registry, a tuple state of a cell that carries one) are checked here too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend
from .cells import Cell, cell_class, cell_names, make_cell
from .errors import InputError, InputTypeError, ShapeError
from .params import finite_in, nonfinite_reason

DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> np.dtype:
    """Normalise a dtype name/object to float32 or float64, else InputError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}") from exc
    if dt.name not in DTYPES:
        raise InputError(f"unsupported dtype {dt.name!r}; expected one of {', '.join(DTYPES)}")
    return dt


def check_positive_int(value: Any, name: str) -> int:
    """An int ≥ 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputTypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise InputError(f"{name} must be ≥ 1, got {value}")
    return int(value)


@dataclass
class Batch:
    """Validated inputs, as arrays of the model's backend.

    x (T, B) int64 tokens or (T, B, D) floats; y (T, B) int64 with padded entries set to 0;
    weight (T, B) 1/0 on counted/padded steps or None; s0 as given, (B, H) or (L·dirs, B, H), or None;
    lengths (B,) on the host. ``s0_stacked`` is s0 as (L·dirs, B, H) (a view; None when s0 is None) and
    ``flat_state`` says whether states are given back as (B, H): s0 was (B, H), or None for a model
    with one recurrence. ``c0_stacked`` an LSTM's c0 as (L·dirs, B, H) (``check_c0``), or None.
    """

    x: Any
    tokens: bool
    T: int
    B: int
    s0: Any = None
    y: Any = None
    weight: Any = None
    lengths: np.ndarray | None = None
    count: int = 0
    s0_stacked: Any = None
    flat_state: bool = True
    c0_stacked: Any = None


#: the refusal of reduction="mean" over a batch with no counted step (every length 0), wherever it is made
NOTHING_COUNTED = "reduction='mean' needs at least one counted step; every length is 0"


def _as_native(be: Backend, a: Any, what: str, hint: str = "") -> Any:
    """``a`` as an array of the backend; a ShapeError naming ``what`` (and ``hint``: what it should be) for a
    ragged nested sequence, which NumPy refuses with its own error."""
    be.check_native(a, what)
    try:
        return be.asarray(a)
    except ValueError:  # NumPy refuses nested lists whose rows differ in length
        raise ShapeError(
            f"{what} is a ragged nested sequence (its rows differ in length); expected a rectangular array"
            + (f", {hint}" if hint else "")
        ) from None


def _is_int(a: Any) -> bool:
    return a.dtype.kind in "iu"


def check_batch(
    be: Backend,
    dtype: np.dtype,
    D: int,
    H: int,
    K: int,
    x: Any,
    y: Any = None,
    s0: Any = None,
    lengths: Any = None,
    *,
    for_loss: bool,
    needs_targets: bool = False,
    num_states: int = 1,
) -> Batch:
    """Validate (x, y, s0, lengths) against a model of sizes D, H, K; return a Batch.

    ``for_loss``: T and B must be ≥ 1; ``needs_targets``: y must be given. ``num_states`` = L·dirs,
    the recurrences of the model: s0 is (num_states, B, H), or (B, H) when num_states is 1.
    """
    x = _as_native(be, x, "x", "e.g. x (T, B) token ids or (T, B, D) floats: pad the sequences and pass lengths")
    if x.ndim == 2:
        tokens = True
        if not _is_int(x):
            raise InputTypeError(
                f"x with shape {tuple(x.shape)} is read as token ids (T, B), which must be integers; "
                f"got dtype {x.dtype} (for dense inputs pass floats of shape (T, B, {D}))"
            )
    elif x.ndim == 3:
        tokens = False
        if x.dtype.kind != "f":
            raise InputTypeError(f"dense x (T, B, D) must be floating point, got dtype {x.dtype}")
        if x.shape[2] != D:
            raise ShapeError(f"dense x must have shape (T, B, {D}), got {tuple(x.shape)}")
    else:
        raise ShapeError(
            f"x must be token ids (T, B) or dense inputs (T, B, {D}); got {x.ndim} dimensions, shape {tuple(x.shape)}"
        )
    T, B = int(x.shape[0]), int(x.shape[1])
    if needs_targets and y is None:
        raise InputError(f"a loss needs targets y (T, B) = ({T}, {B}) of ints in [0, {K}); got None")
    if for_loss and (T == 0 or B == 0):
        raise ShapeError(f"a loss needs at least one time step and one sequence; got T={T}, B={B}")
    batch = Batch(x=x, tokens=tokens, T=T, B=B)

    if s0 is not None:
        s0 = _as_native(be, s0, "s0")
        if s0.dtype.kind != "f":
            raise InputTypeError(f"s0 must be floating point, got dtype {s0.dtype}")
        if num_states == 1 and tuple(s0.shape) not in ((B, H), (1, B, H)):
            raise ShapeError(f"s0 must have shape (B, H) = ({B}, {H}) or (1, B, H), got {tuple(s0.shape)}")
        if num_states > 1 and tuple(s0.shape) != (num_states, B, H):
            raise ShapeError(
                f"s0 must have shape (num_layers·dirs, B, H) = ({num_states}, {B}, {H}) (torch's h0 layout), "
                f"got {tuple(s0.shape)}"
            )

    if lengths is not None:
        lengths = _as_native(be, lengths, "lengths")
        if not _is_int(lengths):
            raise InputTypeError(f"lengths must be integers, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (B,):
            raise ShapeError(f"lengths must have shape (B,) = ({B},), got {tuple(lengths.shape)}")
        lengths = be.to_numpy(lengths)  # B ints: tiny host copy
        out_of_range = (lengths < 0) | (lengths > T)  # in the given dtype: a uint64 is never read as negative
        if out_of_range.any():
            bad = int(np.flatnonzero(out_of_range)[0])
            raise InputError(f"lengths must lie in [0, T] = [0, {T}]; lengths[{bad}] = {lengths[bad].item()}")
        lengths = lengths.astype(np.int64)

    xp = be.xp
    weight = None
    if lengths is not None:
        weight_b = np.arange(T)[:, None] < lengths[None, :]  # (T, B) on the host
        weight = be.asarray(weight_b, dtype=dtype)
        batch.count = int(weight_b.sum())
    else:
        batch.count = T * B

    if y is not None:
        y = _as_native(be, y, "y")
        if not _is_int(y):
            raise InputTypeError(f"targets y must be integers, got dtype {y.dtype}")
        if tuple(y.shape) != (T, B):
            raise ShapeError(f"targets y must have shape (T, B) = ({T}, {B}), got {tuple(y.shape)}")
        if weight is not None:
            y = xp.where(weight > 0, y, 0)  # padded targets may hold anything: make them safe

    # finiteness in the model's dtype: a finite float64 beyond float32's range overflows in the cast
    raw_x = x
    if not tokens:
        x, x_finite = finite_in(x, dtype, xp=xp)
    s0_cast = None
    if s0 is not None:
        s0_cast, s0_finite = finite_in(s0, dtype, xp=xp)

    # one batched range check, one host sync (float64 holds the verdicts; exact values are read on failure)
    probes: list[Any] = []
    if tokens and x.size:
        probes += [x.min(), x.max()]
    if y is not None and y.size:
        probes += [y.min(), y.max()]
    if not tokens and x.size:
        probes.append(x_finite)
    if s0 is not None and s0.size:
        probes.append(s0_finite)
    if probes:
        vals = be.to_numpy(xp.stack([p.astype(xp.float64) for p in probes]))
        i = 0
        if tokens and x.size:
            lo, hi = vals[i], vals[i + 1]
            i += 2
            if lo < 0 or hi >= D:
                bad = be.to_numpy(x.min() if lo < 0 else x.max()).item()  # exact, even near 2**63
                raise InputError(f"token ids must lie in [0, {D}) (input_size = {D}); found {bad}")
        if y is not None and y.size:
            lo, hi = vals[i], vals[i + 1]
            i += 2
            if lo < 0 or hi >= K:
                bad = be.to_numpy(y.min() if lo < 0 else y.max()).item()
                where = " on a counted step" if weight is not None else ""
                raise InputError(f"targets y must lie in [0, {K}) (output_size = {K}); found {bad}{where}")
        if not tokens and x.size:
            if not vals[i]:
                why = nonfinite_reason(raw_x, dtype, xp=xp)
                raise InputError(f"dense x {why}; inputs must be finite in the model's dtype")
            i += 1
        if s0 is not None and s0.size and not vals[i]:
            why = nonfinite_reason(s0, dtype, xp=xp)
            raise InputError(f"s0 {why}; the initial state must be finite in the model's dtype")

    # ids and targets in range: int64 from here on (the range check ran in their own dtype)
    batch.x = x.astype(xp.int64, copy=False) if tokens else x
    batch.s0 = s0_cast
    batch.s0_stacked = None if s0_cast is None else s0_cast.reshape(num_states, B, H)
    batch.flat_state = num_states == 1 and (s0_cast is None or s0_cast.ndim == 2)
    batch.y = None if y is None else y.astype(xp.int64, copy=False)
    batch.weight, batch.lengths = weight, lengths
    return batch


def check_c0(be: Backend, dtype: np.dtype, c0: Any, batch: Batch) -> None:
    """Validate an LSTM's c0 against the batch's checked h0 (same shape) and set ``batch.c0_stacked``.

    c0 (B, H) or (L·dirs, B, H), as h0 was given: floating point and finite in the model's dtype.
    """
    c0 = _as_native(be, c0, "c0")
    if c0.dtype.kind != "f":
        raise InputTypeError(f"c0 must be floating point, got dtype {c0.dtype}")
    if tuple(c0.shape) != tuple(batch.s0.shape):
        raise ShapeError(f"c0 must have the shape of h0, {tuple(batch.s0.shape)}, got {tuple(c0.shape)}")
    cast, finite = finite_in(c0, dtype, xp=be.xp)
    if c0.size and not bool(finite):
        why = nonfinite_reason(c0, dtype, xp=be.xp)
        raise InputError(f"c0 {why}; the initial state must be finite in the model's dtype")
    batch.c0_stacked = cast.reshape(batch.s0_stacked.shape)


# ---- the model's options ----

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


def effective_truncate(truncate: int | None, T: int) -> int | None:
    """The window a call of T steps runs: None (full BPTT) for None or a window over every step (k ≥ T − 1)."""
    return None if truncate is None or truncate >= T - 1 else truncate


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


def check_dropout(dropout: Any) -> float:
    """The dropout probability as a float in [0, 1), else InputTypeError / InputError naming it."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.integer, np.floating)):
        raise InputTypeError(f"dropout must be a number in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0 <= dropout < 1:  # also refuses NaN
        raise InputError(f"dropout must lie in [0, 1) (the probability of zeroing a layer's output), got {dropout}")
    return float(dropout)


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool where it is one (Python's or NumPy's); InputTypeError naming ``name`` otherwise (a string
    such as "no" or "False" would read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _check_layers(num_layers: Any, bidirectional: Any, dropout: Any) -> tuple[int, bool, float]:
    L = check_positive_int(num_layers, "num_layers")
    check_bool(bidirectional, "bidirectional")
    dropout = check_dropout(dropout)
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


def batch_copies(batch: Batch, x: Any, y: Any) -> int:
    """Bytes of the copies a checked batch holds of the caller's x and y (cast to the dtypes the call computes in:
    dense x in the model's, ids and targets as int64); 0 where it computes on the caller's arrays themselves."""
    return sum(
        int(a.nbytes) for a, given in ((batch.x, x), (batch.y, y))
        if a is not None and getattr(given, "dtype", None) != a.dtype
    )  # fmt: skip
