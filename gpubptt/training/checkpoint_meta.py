"""Validation of a checkpoint's description (the ``meta`` JSON): every field's type and range, one line
per problem, all raised together as one CheckpointError. The model's section is checked here; the
training record's sections by the checks its ``RecordSchema`` brings (``gpubptt.training.record``), so
the file format imports no training code.

Format versions: 1 (the model's sizes, dtype, bias and init) and 2 (the same, plus the architecture:
``cell`` (a registered cell's recorded name: "elman", "gru", "lstm", "indrnn", …), ``nonlinearity``
(null for a cell without one), ``num_layers``, ``bidirectional``; optionally ``cell_options``, the
cell's further options, written only for a cell that has some). Version 1 files are read as the one
architecture they could hold: one layer of the tanh Elman cell, one direction. Version 3: version 2's fields,
and the optimizer's state may hold its base rate and last scheduled rate (``optim.base_lr``,
``optim.scheduled_lr``), which a reader of version 2 would refuse as unexpected entries. Version 4: version 3's,
and the rate the optimizer's next step uses (``optim.lr``: one set by hand kept), which a reader of version 3
would refuse.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..cells import NONLINEARITIES, cell_class, cell_names
from ..engine.memory import MAX_LAYERS  # a sanity bound on model.num_layers, the model's own
from ..errors import CheckpointError, InputError

__all__ = [
    "ARCHITECTURE",
    "FORMAT",
    "READS",
    "VERSION",
    "Fields",
    "RecordSchema",
    "check_meta",
    "raise_problems",
    "show",
]

FORMAT = "gpubptt-checkpoint"
VERSION = 4  # what this gpubptt writes
READS = (1, 2, 3, 4)  # what it reads
#: The architecture fields of version 2 and their defaults (what a version 1 file holds).
ARCHITECTURE = {"cell": "elman", "nonlinearity": "tanh", "num_layers": 1, "bidirectional": False}
#: Fields of the architecture that take one of several values here (the first is the default).
#: (the cells: every registered cell's recorded name, read when a file is checked; see ``_recorded_cells``)
CHOICES = {"cell": ("elman",), "nonlinearity": NONLINEARITIES}
_INT_MAX = 2**63 - 1  # steps and positions are stored as int64
SIZE_MAX = 2**31 - 1  # model sizes, batch, chunk and task lengths: anything larger cannot be allocated
_META_KEYS = ("format", "version", "model", "optimizer", "data", "config", "state")


def show(v: Any) -> str:
    """A value as the JSON in the file spells it (true, "no", 1.5), cut short when long."""
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):  # not JSON, or an int too long to print
        s = f"<a {type(v).__name__}>"
    return s if len(s) <= 60 else s[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A JSON number that is a finite float, or an int that converts to one (not past 1.8e308)."""
    return (isinstance(v, float) and math.isfinite(v)) or (_is_int(v) and abs(v) <= sys.float_info.max)


class Fields:
    """Collects the problems of one meta dict; each check appends one line and says whether the value is fit."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, name: str, v: Any, expected: str) -> bool:
        self.problems.append(f"{name} = {show(v)}, expected {expected}")
        return False

    def integer(self, name: str, v: Any, lo: int, hi: int = _INT_MAX, *, null: bool = False) -> bool:
        if null and v is None:
            return True
        if _is_int(v) and lo <= v <= hi:
            return True
        rng = f"≥ {lo}" if hi == _INT_MAX else f"from {lo} to {hi}"
        return self.bad(name, v, f"an int {rng}" + (" or null" if null else ""))

    def number(self, name: str, v: Any, lo: float, hi: float = math.inf, *, lo_open: bool, null: bool = False) -> bool:
        """A finite JSON number (int or float) in [lo, hi) or, with ``lo_open``, (lo, hi)."""
        if null and v is None:
            return True
        if is_number(v) and (lo < v if lo_open else lo <= v) and v < hi:
            return True
        if hi == math.inf:
            what = f"a finite number {'>' if lo_open else '≥'} {lo}"
        else:
            what = f"a number in {'(' if lo_open else '['}{lo}, {hi})"
        return self.bad(name, v, what + (" or null" if null else ""))

    def flag(self, name: str, v: Any) -> bool:
        return isinstance(v, bool) or self.bad(name, v, "true or false")

    def text(self, name: str, v: Any) -> bool:
        return (isinstance(v, str) and v != "") or self.bad(name, v, "a non-empty string")

    def choice(self, name: str, v: Any, choices: tuple[str, ...]) -> bool:
        return (isinstance(v, str) and v in choices) or self.bad(name, v, "one of " + ", ".join(map(repr, choices)))

    def section(self, name: str, v: Any, *, null: bool) -> bool:
        if isinstance(v, dict) or (null and v is None):
            return True
        return self.bad(name, v, "a JSON object" + (" or null" if null else ""))

    def keys(self, name: str, d: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> bool:
        missing = [k for k in required if k not in d]
        extra = sorted(set(d) - set(required) - set(optional))
        for k in missing:
            self.problems.append(f"{name}.{k} is missing")
        for k in extra:
            self.problems.append(f"{name}.{k} is not a field of {name} (expected {', '.join(required + optional)})")
        return not (missing or extra)


def _check_model(f: Fields, m: dict[str, Any], version: int) -> None:
    arch = tuple(ARCHITECTURE)
    required = ("input_size", "hidden_size", "output_size", "dtype", "bias") + (arch if version >= 2 else ())
    if not f.keys("model", m, required, ("init", "dropout", "cell_options")):
        return
    for k in ("input_size", "hidden_size", "output_size"):
        f.integer(f"model.{k}", m[k], 1, SIZE_MAX)
    f.choice("model.dtype", m["dtype"], ("float32", "float64"))
    f.flag("model.bias", m["bias"])
    if "init" in m:
        f.text("model.init", m["init"])
    for k, built in ARCHITECTURE.items():
        if k not in m:
            continue
        if k == "nonlinearity" and _takes_no_nonlinearity(m.get("cell")):  # the gated cells have none
            if m[k] is not None:
                f.bad("model.nonlinearity", m[k], f"null for cell {show(m['cell'])} (its gates use σ and tanh)")
        elif k in CHOICES:
            f.choice(f"model.{k}", m[k], _recorded_cells() if k == "cell" else CHOICES[k])
        elif k == "num_layers":
            f.integer("model.num_layers", m[k], 1, MAX_LAYERS)
        elif k == "bidirectional":
            f.flag("model.bidirectional", m[k])
        elif type(m[k]) is not type(built) or m[k] != built:  # 1 is not true, nor true 1
            f.bad(f"model.{k}", m[k], f"{show(built)}, the only {k.replace('_', ' ')} this gpubptt builds")
    if "dropout" in m:
        f.number("model.dropout", m["dropout"], 0, 1, lo_open=False)
    if "cell_options" in m:  # a cell's options beyond nonlinearity (the cell checks their values on load)
        f.section("model.cell_options", m["cell_options"], null=False)


def _recorded_cells() -> tuple[str, ...]:
    """The names a checkpoint records for the registered cells ("elman", "gru", "lstm", …), the default first."""
    return tuple(cell_class(c).name for c in cell_names())


def _takes_no_nonlinearity(name: Any) -> bool:
    """Whether the recorded cell ``name`` is a registered cell without a nonlinearity option (GRU, LSTM)."""
    try:
        return not cell_class(name, recorded=True).takes_nonlinearity
    except InputError:
        return False


@dataclass(frozen=True)
class RecordSchema:
    """How a checkpoint's training record is checked, as the training application declares it: the file
    format stores the record beside the model without reading it (``gpubptt.training.record`` is the one).

    ``required``, ``optional``: the record's sections of ``meta`` (objects; an optional one may be null);
    ``check_sections(f, meta)`` appends one line per problem in them to ``f`` (``meta["model"]`` is
    there to check against); ``owns(entry, cell)`` says whether an archive entry (beside "meta" and
    "param.*") is the record's; ``finite``: prefixes of the record's entries that must hold finite values.
    """

    required: tuple[str, ...]
    optional: tuple[str, ...]
    check_sections: Callable[[Fields, dict[str, Any]], None]
    owns: Callable[[str, Any], bool]
    finite: tuple[str, ...] = ()


def check_meta(arrays: dict[str, np.ndarray], where: str, record: RecordSchema) -> dict[str, Any]:
    """The parsed and validated meta JSON, the model's section here and the record's by ``record``;
    CheckpointError listing every problem, one line each."""
    m = arrays.get("meta")
    if m is None or m.dtype.kind != "U" or m.shape != ():
        raise CheckpointError(f"{where} has no 'meta' entry (a 0-d string array): not a gpubptt checkpoint")
    try:
        meta = json.loads(str(m))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of too many digits, deep nesting
        raise CheckpointError(f"{where}: 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: 'meta' is the JSON {type(meta).__name__} {show(meta)}, expected an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a gpubptt checkpoint (format tag {show(meta.get('format'))})")
    if not _is_int(meta.get("version")) or meta["version"] not in READS:
        reads = ", ".join(map(str, READS[:-1])) + f" and {READS[-1]}"
        raise CheckpointError(f"{where} has format version {show(meta.get('version'))}; this gpubptt reads {reads}")
    f = Fields()
    f.keys("meta", meta, ("format", "version", "model", *record.required), record.optional)
    if "model" in meta and f.section("model", meta["model"], null=False):
        _check_model(f, meta["model"], meta["version"])
    record.check_sections(f, meta)
    raise_problems(where, f.problems)
    return meta


def raise_problems(where: str, problems: list[str]) -> None:
    """CheckpointError: the one problem, or how many and one line each; nothing when there are none."""
    if len(problems) == 1:
        raise CheckpointError(f"{where}: {problems[0]}")
    if problems:
        raise CheckpointError(f"{where} has {len(problems)} problems:\n  " + "\n  ".join(problems))
