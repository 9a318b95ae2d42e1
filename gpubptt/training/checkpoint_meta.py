"""Validation of a checkpoint's description (the ``meta`` JSON) and history: every field's type and
range, one line per problem, all raised together as one CheckpointError.

Format versions: 1 (the model's sizes, dtype, bias and init) and 2 (the same, plus the architecture:
``cell`` (a registered cell's recorded name: "elman", "gru", "lstm", "indrnn", …), ``nonlinearity``
(null for a cell without one), ``num_layers``, ``bidirectional``; optionally ``cell_options``, the
cell's further options, written only for a cell that has some). Version 1 files are read as the one
architecture they could hold: one layer of the tanh Elman cell, one direction.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

import numpy as np

from ..cells import NONLINEARITIES, cell_class, cell_names
from ..engine.memory import MAX_LAYERS  # a sanity bound on model.num_layers, the model's own
from ..errors import CheckpointError, InputError
from .data import TASKS
from .loop import SCHEDULES, History, TrainConfig, TrainState
from .optim import ON_NONFINITE, OPTIMIZERS

__all__ = ["ARCHITECTURE", "FORMAT", "READS", "VERSION", "check_history", "check_meta", "show"]

FORMAT = "gpubptt-checkpoint"
VERSION = 2  # what this gpubptt writes
READS = (1, 2)  # what it reads
#: The architecture fields of version 2 and their defaults (what a version 1 file holds).
ARCHITECTURE = {"cell": "elman", "nonlinearity": "tanh", "num_layers": 1, "bidirectional": False}
#: Fields of the architecture that take one of several values here (the first is the default).
#: (the cells: every registered cell's recorded name, read when a file is checked; see ``_recorded_cells``)
CHOICES = {"cell": ("elman",), "nonlinearity": NONLINEARITIES}
_INT_MAX = 2**63 - 1  # steps and positions are stored as int64
_SIZE_MAX = 2**31 - 1  # model sizes, batch, chunk and task lengths: anything larger cannot be allocated
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


def _is_num(v: Any) -> bool:
    """A JSON number that is a finite float, or an int that converts to one (not past 1.8e308)."""
    return (isinstance(v, float) and math.isfinite(v)) or (_is_int(v) and abs(v) <= sys.float_info.max)


class _Fields:
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
        if _is_num(v) and (lo < v if lo_open else lo <= v) and v < hi:
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


def _check_model(f: _Fields, m: dict[str, Any], version: int) -> None:
    arch = tuple(ARCHITECTURE)
    required = ("input_size", "hidden_size", "output_size", "dtype", "bias") + (arch if version >= 2 else ())
    if not f.keys("model", m, required, ("init", "dropout", "cell_options")):
        return
    for k in ("input_size", "hidden_size", "output_size"):
        f.integer(f"model.{k}", m[k], 1, _SIZE_MAX)
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


def _check_optimizer(f: _Fields, o: dict[str, Any]) -> None:
    if "name" not in o:
        f.problems.append("optimizer.name is missing")
        return
    if not f.choice("optimizer.name", o["name"], tuple(OPTIMIZERS)):
        return
    extra = {"sgd": ("momentum",), "adagrad": ("eps",), "adam": ("betas", "eps")}[o["name"]]
    if not f.keys("optimizer", o, ("name", "lr", "on_nonfinite", *extra), ("weight_decay",)):
        return
    f.number("optimizer.lr", o["lr"], 0, lo_open=True)
    f.choice("optimizer.on_nonfinite", o["on_nonfinite"], ON_NONFINITE)
    if "momentum" in o:
        f.number("optimizer.momentum", o["momentum"], 0, 1, lo_open=False)
    if "weight_decay" in o:  # decoupled (AdamW); absent: 0
        f.number("optimizer.weight_decay", o["weight_decay"], 0, lo_open=False)
    if "eps" in o:
        f.number("optimizer.eps", o["eps"], 0, lo_open=False)
    if "betas" in o:
        b = o["betas"]
        if not (isinstance(b, list) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)):
            f.bad("optimizer.betas", b, "a list of two numbers in [0, 1)")


def _check_data(f: _Fields, d: dict[str, Any]) -> None:
    if "kind" not in d:
        return  # a caller's own description (save_checkpoint(data=...)): kept as it is, never resumed
    if not f.choice("data.kind", d["kind"], TASKS):
        return
    if d["kind"] == "text":
        val = ("val_source", "val_sha256", "val_size_bytes")  # a separate held-out text (--val-data)
        if not f.keys("data", d, ("kind", "source", "val_fraction"), ("sha256", "size_bytes", *val)):
            return
        f.text("data.source", d["source"])
        if any(k in d for k in val):
            if not all(k in d for k in val):
                f.problems.append("data.val_source, data.val_sha256 and data.val_size_bytes must be given together")
            elif d["val_fraction"] is not None:
                f.bad("data.val_fraction", d["val_fraction"], "null beside data.val_source (a separate held-out text)")
            else:
                f.text("data.val_source", d["val_source"])
                if not (isinstance(d["val_sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", d["val_sha256"])):
                    f.bad("data.val_sha256", d["val_sha256"], "64 lowercase hex digits")
                f.integer("data.val_size_bytes", d["val_size_bytes"], 1)
        else:
            f.number("data.val_fraction", d["val_fraction"], 0, 1, lo_open=True)
        if ("sha256" in d) != ("size_bytes" in d):
            f.problems.append("data.sha256 and data.size_bytes must be given together")
        if "sha256" in d and not (isinstance(d["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", d["sha256"])):
            f.bad("data.sha256", d["sha256"], "64 lowercase hex digits")
        if "size_bytes" in d:
            f.integer("data.size_bytes", d["size_bytes"], 1)
        return
    if not f.keys("data", d, ("kind", "symbols", "length", "delay")):
        return
    ok = f.integer("data.symbols", d["symbols"], 2, _SIZE_MAX)
    ok &= f.integer("data.length", d["length"], 1, _SIZE_MAX)
    ok &= f.integer("data.delay", d["delay"], 0, _SIZE_MAX)
    if ok and (d["kind"] == "recall") != (d["length"] == 1):
        f.bad("data.kind", d["kind"], f"{'recall' if d['length'] == 1 else 'copy'} for data.length = {d['length']}")


def _check_config(f: _Fields, c: dict[str, Any]) -> None:
    if not f.keys("config", c, tuple(TrainConfig.__dataclass_fields__)):
        return
    f.integer("config.steps", c["steps"], 1)
    f.integer("config.batch_size", c["batch_size"], 1, _SIZE_MAX)
    f.integer("config.chunk", c["chunk"], 1, _SIZE_MAX, null=True)
    f.integer("config.truncate", c["truncate"], 0, _SIZE_MAX, null=True)
    f.number("config.max_norm", c["max_norm"], 0, lo_open=True, null=True)
    f.number("config.lr", c["lr"], 0, lo_open=True)
    f.choice("config.schedule", c["schedule"], SCHEDULES)
    f.integer("config.warmup", c["warmup"], 0)
    f.integer("config.eval_every", c["eval_every"], 0)
    f.integer("config.seed", c["seed"], 0)


def _check_state(f: _Fields, s: dict[str, Any]) -> None:
    if f.keys("state", s, ("step", "sequence", "chunk")):
        for k in ("step", "sequence", "chunk"):
            f.integer(f"state.{k}", s[k], 0)


def _check_consistency(f: _Fields, meta: dict[str, Any]) -> None:
    """Cross-field checks, run only on sections that passed their own."""
    m, d, c, s = meta["model"], meta.get("data"), meta.get("config"), meta["state"]
    D, K = m["input_size"], m["output_size"]
    kind = None if d is None else d.get("kind")  # None: no data, or a caller's own description
    if kind in ("copy", "recall") and (D, K) != (d["symbols"] + 2, d["symbols"] + 1):
        f.problems.append(
            f"data.symbols = {d['symbols']} needs input_size {d['symbols'] + 2} and output_size {d['symbols'] + 1}, "
            f"but the model has {D} and {K}"
        )
    if kind == "text" and D != K:
        f.problems.append(
            f"model.input_size = {D} and model.output_size = {K}, expected both equal (a text model's vocabulary size)"
        )
    if c is None:
        return
    # the chunk index is at most the number of chunks of the current sequence (equal: the sequence is done)
    T, n_chunks = c["chunk"], None
    if T is None:
        n_chunks = 1  # whole sequences: one chunk each
    elif kind in ("copy", "recall"):
        n_chunks = max(1, (2 * d["length"] + d["delay"]) // T)
    elif kind == "text" and "size_bytes" in d:
        n_chunks = max(1, d["size_bytes"] // c["batch_size"] // T)  # an upper bound: a character is ≥ 1 byte
    if n_chunks is not None and s["chunk"] > n_chunks:
        f.bad("state.chunk", s["chunk"], f"at most {n_chunks}, the number of chunks in a sequence")


def check_meta(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """The parsed and validated meta JSON; CheckpointError listing every problem, one line each."""
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
        reads = " and ".join(map(str, READS))
        raise CheckpointError(f"{where} has format version {show(meta.get('version'))}; this gpubptt reads {reads}")
    f = _Fields()
    f.keys("meta", meta, ("format", "version", "model", "state"), ("optimizer", "data", "config"))
    checks = {
        "model": lambda f, m: _check_model(f, m, meta["version"]),
        "optimizer": _check_optimizer,
        "data": _check_data,
        "config": _check_config,
        "state": _check_state,
    }
    for key, check in checks.items():
        if key in meta and f.section(key, meta[key], null=key not in ("model", "state")) and meta[key] is not None:
            check(f, meta[key])
    if not f.problems:
        _check_consistency(f, meta)
    _raise(where, f.problems)
    return meta


def _raise(where: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise CheckpointError(f"{where}: {problems[0]}")
    if problems:
        raise CheckpointError(f"{where} has {len(problems)} problems:\n  " + "\n  ".join(problems))


def check_history(arrays: dict[str, np.ndarray], state: TrainState, where: str) -> History:
    """The training history from the ``history.*`` entries (none: an empty history), every array checked.

    Per step: step (n,) ints in [1, state.step]; loss, grad_norm (n,) floats (NaN/inf where a step
    was skipped); lr (n,) finite ≥ 0. Per evaluation: eval_step (m,) ints in [0, state.step];
    eval_loss (m,) floats; eval_accuracy (m,) in [0, 1]. skipped: a 0-d int in [0, n].
    """
    hist = {k.removeprefix("history."): a for k, a in arrays.items() if k.startswith("history.")}
    if not hist:
        return History()
    lists = History._lists()
    problems = [f"history.{k} is missing" for k in (*lists, "skipped") if k not in hist]
    problems += [f"unexpected entry history.{k}" for k in sorted(set(hist) - {*lists, "skipped"})]
    for k in lists:
        a = hist.get(k)
        if a is None:
            continue
        ints = k in ("step", "eval_step")
        if a.ndim != 1 or a.dtype.kind not in ("iu" if ints else "iuf"):
            problems.append(
                f"history.{k} is a {a.dtype} array of shape {a.shape}, expected a 1-d array of "
                + ("ints" if ints else "numbers")
            )
            continue
        lo, hi = {"step": (1, state.step), "eval_step": (0, state.step), "lr": (0, math.inf)}.get(k, (None, None))
        if k == "eval_accuracy":
            lo, hi = 0, 1
        if lo is not None and a.size and not (np.isfinite(a).all() and a.min() >= lo and a.max() <= hi):
            bad = a[~(np.isfinite(a) & (a >= lo) & (a <= hi))][0]
            problems.append(f"history.{k} holds {bad}, expected values in [{lo}, {hi}]")
    sk = hist.get("skipped")
    if sk is not None and (sk.shape != () or sk.dtype.kind not in "iu" or sk < 0):
        problems.append(f"history.skipped is {sk.dtype} {sk.shape} {show(sk.tolist())}, expected a 0-d int ≥ 0")
    if not problems:
        n, ne = len(hist["step"]), len(hist["eval_step"])
        lengths = {k: len(hist[k]) for k in lists}
        if not (lengths["loss"] == lengths["grad_norm"] == lengths["lr"] == n) or not (
            lengths["eval_loss"] == lengths["eval_accuracy"] == ne
        ):
            problems.append(f"the history arrays have inconsistent lengths {lengths}")
        elif n > state.step or int(hist["skipped"]) > n:
            problems.append(
                f"the history has {n} steps and {int(hist['skipped'])} skipped at state.step = {state.step}, "
                "expected skipped ≤ steps ≤ state.step"
            )
    _raise(where, problems)
    return History.from_arrays(hist)
