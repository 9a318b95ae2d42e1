"""Checkpoints: parameters, optimizer state, vocabulary, configuration and training progress in one .npz.

Layout of the archive (every entry a plain NumPy array, so it loads with ``allow_pickle=False``):

    meta            0-d str: JSON with the format tag, model sizes/dtype, optimizer, data, training
                    config and position (step, sequence, chunk)
    param.U  param.W  param.V  [param.b  param.c]       the model, in its dtype
    optim.t  optim.<slot>.<param>                        the optimizer state
    vocab           (K,) int32 code points (text models)
    carry.s         (B, H) the hidden state carried into the next chunk (mid-sequence only)
    history.*       per-step loss, gradient norm, lr; evaluation steps, losses, accuracies

Arrays are always stored as host NumPy arrays, so a checkpoint written on CuPy loads on NumPy and
back. Writing is atomic: a temporary file in the same directory, flushed and fsync'ed, then
``os.replace``'d over the target, so a crash never leaves a half-written checkpoint and a failed
save leaves any previous file untouched. Loading validates every name, shape and dtype, and every
field of ``meta`` (type and range: ints are JSON ints, flags JSON booleans, sections objects or
null; the training position fits the configuration and data), before building anything, and
raises CheckpointError (a ValueError) with one line per problem, naming the field, its value and
what was expected. Nothing is ever unpickled, and no message suggests it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomic
from .backend import Backend, get_backend, to_numpy
from .data import TASKS, Vocab
from .errors import InputError
from .model import RNN
from .optim import ON_NONFINITE, OPTIMIZERS, Optimizer, make_optimizer
from .train import SCHEDULES, History, TrainConfig, TrainState

__all__ = ["FORMAT", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT = "gpubptt-checkpoint"
VERSION = 1


class CheckpointError(InputError):
    """A checkpoint file is missing, truncated, corrupt, or does not describe a valid model."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns; ``optimizer`` holds ``model``'s parameters (None if none was saved)."""

    model: RNN
    optimizer: Optimizer | None
    vocab: Vocab | None
    data: dict[str, Any] | None
    config: TrainConfig | None
    state: TrainState
    history: History
    meta: dict[str, Any]


def _host(a: Any) -> np.ndarray:
    return np.asarray(to_numpy(a))  # a device-to-host copy for CuPy arrays; 0-d stays 0-d


def save_checkpoint(
    path: str | os.PathLike[str],
    model: RNN,
    *,
    optimizer: Optimizer | None = None,
    vocab: Vocab | None = None,
    data: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    state: TrainState | None = None,
    history: History | None = None,
) -> Path:
    """Write a checkpoint to ``path`` atomically; return the path.

    Shapes as in the model: U (H, D), W (H, H), V (K, H), b (H,), c (K,); carried state (B, H).
    The description and history are checked as ``load_checkpoint`` checks them, so a file it
    would refuse is never written (CheckpointError, and any existing file stays as it was).
    """
    path = Path(path)
    state = TrainState() if state is None else state
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "input_size": model.input_size,
            "hidden_size": model.hidden_size,
            "output_size": model.output_size,
            "dtype": model.dtype.name,
            "bias": model.bias,
            "init": getattr(model, "init", "custom"),
        },
        "optimizer": None if optimizer is None else {"name": optimizer.name, **optimizer.hyperparameters()},
        "data": data,
        "config": None if config is None else asdict(config),
        "state": {"step": state.step, "sequence": state.sequence, "chunk": state.chunk},
    }
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
    for k, p in model.params.items():
        arrays[f"param.{k}"] = _host(p)
    if optimizer is not None:
        for k, a in optimizer.state_dict().items():
            arrays[f"optim.{k}"] = _host(a)
    if vocab is not None:
        arrays["vocab"] = vocab.to_array()
    if state.s is not None:
        arrays["carry.s"] = _host(state.s)
    for k, a in (History() if history is None else history).to_arrays().items():
        arrays[f"history.{k}"] = a
    where = f"cannot write checkpoint {str(path)!r}"
    _meta(arrays, where)  # refuse what load_checkpoint would refuse, before anything is written
    _history(arrays, state, where)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: directory {str(directory)!r} does not exist")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())  # the old file stays whole if anything fails
    return path


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an .npz), or an empty one
_NPY_MAGIC = b"\x93NUMPY"


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every entry of the archive as a host array; CheckpointError for anything that is not an .npz of plain arrays.

    Nothing here ever unpickles: a file or entry holding Python objects is refused, and the message
    says so without suggesting to load it any other way.
    """
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, expected an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc.strerror}") from None
    if head.startswith(_NPY_MAGIC):
        raise CheckpointError(
            f"{str(path)!r} is a single .npy array, not a gpubptt checkpoint (an .npz archive written by "
            "`gpubptt train` or save_checkpoint)"
        )
    if not head.startswith(_ZIP_MAGIC):
        kind = "an empty file" if not head else f"not an .npz (zip) archive: it starts with {head!r}"
        raise CheckpointError(f"{str(path)!r} is not a readable gpubptt checkpoint: {kind}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for k in z.files:  # read every member now: CRC and format errors surface here
                try:
                    a = z[k]
                except ValueError as exc:
                    if "pickle" not in str(exc):
                        raise
                    raise CheckpointError(
                        f"{str(path)!r} is not a readable gpubptt checkpoint: entry {k!r} holds Python objects "
                        "(pickled data), and a gpubptt checkpoint holds plain numeric and string arrays only"
                    ) from None
                if not isinstance(a, np.ndarray):
                    raise CheckpointError(
                        f"{str(path)!r} is not a readable gpubptt checkpoint: entry {k!r} is not a NumPy "
                        "array (.npy), and a gpubptt checkpoint holds arrays only"
                    )
                arrays[k] = a
    except CheckpointError:
        raise
    except Exception as exc:  # any parse failure of an untrusted file: BadZipFile, bad CRC, bad .npy header...
        raise CheckpointError(
            f"{str(path)!r} is not a readable gpubptt checkpoint (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return arrays


# -- validation of the meta JSON: every field's type and range, one line per problem -------------
_INT_MAX = 2**63 - 1  # steps and positions are stored as int64
_SIZE_MAX = 2**31 - 1  # model sizes, batch, chunk and task lengths: anything larger cannot be allocated
_META_KEYS = ("format", "version", "model", "optimizer", "data", "config", "state")


def _show(v: Any) -> str:
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
        self.problems.append(f"{name} = {_show(v)}, expected {expected}")
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


def _check_model(f: _Fields, m: dict[str, Any]) -> None:
    if not f.keys("model", m, ("input_size", "hidden_size", "output_size", "dtype", "bias"), ("init",)):
        return
    for k in ("input_size", "hidden_size", "output_size"):
        f.integer(f"model.{k}", m[k], 1, _SIZE_MAX)
    f.choice("model.dtype", m["dtype"], ("float32", "float64"))
    f.flag("model.bias", m["bias"])
    if "init" in m:
        f.text("model.init", m["init"])


def _check_optimizer(f: _Fields, o: dict[str, Any]) -> None:
    if "name" not in o:
        f.problems.append("optimizer.name is missing")
        return
    if not f.choice("optimizer.name", o["name"], tuple(OPTIMIZERS)):
        return
    extra = {"sgd": ("momentum",), "adagrad": ("eps",), "adam": ("betas", "eps")}[o["name"]]
    if not f.keys("optimizer", o, ("name", "lr", "on_nonfinite", *extra)):
        return
    f.number("optimizer.lr", o["lr"], 0, lo_open=True)
    f.choice("optimizer.on_nonfinite", o["on_nonfinite"], ON_NONFINITE)
    if "momentum" in o:
        f.number("optimizer.momentum", o["momentum"], 0, 1, lo_open=False)
    if "eps" in o:
        f.number("optimizer.eps", o["eps"], 0, lo_open=False)
    if "betas" in o:
        b = o["betas"]
        if not (isinstance(b, list) and len(b) == 2 and all(_is_num(x) and 0 <= x < 1 for x in b)):
            f.bad("optimizer.betas", b, "a list of two numbers in [0, 1)")


def _check_data(f: _Fields, d: dict[str, Any]) -> None:
    if "kind" not in d:
        f.problems.append("data.kind is missing")
        return
    if not f.choice("data.kind", d["kind"], TASKS):
        return
    if d["kind"] == "text":
        if not f.keys("data", d, ("kind", "source", "val_fraction"), ("sha256", "size_bytes")):
            return
        f.text("data.source", d["source"])
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
    if d is not None and d["kind"] in ("copy", "recall") and (D, K) != (d["symbols"] + 2, d["symbols"] + 1):
        f.problems.append(
            f"data.symbols = {d['symbols']} needs input_size {d['symbols'] + 2} and output_size {d['symbols'] + 1}, "
            f"but the model has {D} and {K}"
        )
    if d is not None and d["kind"] == "text" and D != K:
        f.problems.append(
            f"model.input_size = {D} and model.output_size = {K}, expected both equal (a text model's vocabulary size)"
        )
    if c is None:
        return
    # the chunk index is at most the number of chunks of the current sequence (equal: the sequence is done)
    T, n_chunks = c["chunk"], None
    if T is None:
        n_chunks = 1  # whole sequences: one chunk each
    elif d is not None and d["kind"] in ("copy", "recall"):
        n_chunks = max(1, (2 * d["length"] + d["delay"]) // T)
    elif d is not None and "size_bytes" in d:
        n_chunks = max(1, d["size_bytes"] // c["batch_size"] // T)  # an upper bound: a character is ≥ 1 byte
    if n_chunks is not None and s["chunk"] > n_chunks:
        f.bad("state.chunk", s["chunk"], f"at most {n_chunks}, the number of chunks in a sequence")


def _meta(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """The parsed and validated meta JSON; CheckpointError listing every problem, one line each."""
    m = arrays.get("meta")
    if m is None or m.dtype.kind != "U" or m.shape != ():
        raise CheckpointError(f"{where} has no 'meta' entry (a 0-d string array): not a gpubptt checkpoint")
    try:
        meta = json.loads(str(m))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of too many digits, deep nesting
        raise CheckpointError(f"{where}: 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: 'meta' is the JSON {type(meta).__name__} {_show(meta)}, expected an object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a gpubptt checkpoint (format tag {_show(meta.get('format'))})")
    if not _is_int(meta.get("version")) or meta["version"] != VERSION:
        raise CheckpointError(f"{where} has format version {_show(meta.get('version'))}; this gpubptt reads {VERSION}")
    f = _Fields()
    f.keys("meta", meta, ("format", "version", "model", "state"), ("optimizer", "data", "config"))
    checks = {"model": _check_model, "optimizer": _check_optimizer, "data": _check_data, "config": _check_config,
              "state": _check_state}  # fmt: skip
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


def _history(arrays: dict[str, np.ndarray], state: TrainState, where: str) -> History:
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
        problems.append(f"history.skipped is {sk.dtype} {sk.shape} {_show(sk.tolist())}, expected a 0-d int ≥ 0")
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


def load_checkpoint(path: str | os.PathLike[str], *, backend: str | Backend | None = "auto") -> Checkpoint:
    """Read and validate a checkpoint; build the model (and optimizer) on ``backend``.

    Raises CheckpointError naming the problem (missing, truncated, corrupt, wrong names, shapes or
    dtypes) before anything is built.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    arrays = _read(path)
    meta = _meta(arrays, where)
    mm = meta["model"]  # validated by _meta: ints, a float dtype name, a bool
    D, H, K = mm["input_size"], mm["hidden_size"], mm["output_size"]
    dtype, bias = np.dtype(mm["dtype"]), mm["bias"]

    # names
    param_names = ("U", "W", "V", "b", "c") if bias else ("U", "W", "V")
    expected_shapes = {"U": (H, D), "W": (H, H), "V": (K, H), "b": (H,), "c": (K,)}
    known = {"meta", "vocab", "carry.s"} | {f"param.{k}" for k in param_names}
    for k in arrays:
        if k not in known and not k.startswith(("optim.", "history.")):
            raise CheckpointError(f"{where}: unexpected entry {k!r}")
    params = {}
    for k in param_names:
        a = arrays.get(f"param.{k}")
        if a is None:
            raise CheckpointError(f"{where} is missing parameter {k}")
        if a.shape != expected_shapes[k]:
            raise CheckpointError(f"{where}: parameter {k} has shape {a.shape}, expected {expected_shapes[k]}")
        if a.dtype != dtype:
            raise CheckpointError(f"{where}: parameter {k} has dtype {a.dtype}, expected {dtype.name}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{where}: parameter {k} contains NaN or infinity")
        params[k] = a

    vocab = None
    if "vocab" in arrays:
        try:
            vocab = Vocab.from_array(arrays["vocab"])
        except InputError as exc:
            raise CheckpointError(f"{where}: bad vocabulary ({exc})") from None
        if len(vocab) != D or len(vocab) != K:
            raise CheckpointError(f"{where}: vocabulary has {len(vocab)} characters but the model has D={D}, K={K}")
    kind = (meta.get("data") or {}).get("kind")
    if kind == "text" and vocab is None:
        raise CheckpointError(f"{where}: data.kind = \"text\" but there is no 'vocab' entry to encode the text with")
    if kind in ("copy", "recall") and vocab is not None:
        raise CheckpointError(f"{where}: data.kind = {_show(kind)} is not text, yet there is a 'vocab' entry")

    config = None
    if meta.get("config") is not None:
        try:
            config = TrainConfig(**meta["config"])
        except (TypeError, InputError) as exc:
            raise CheckpointError(f"{where}: bad training config ({exc})") from None

    ms = meta["state"]  # validated by _meta: ints ≥ 0
    state = TrainState(step=ms["step"], sequence=ms["sequence"], chunk=ms["chunk"])
    if "carry.s" in arrays:
        s = arrays["carry.s"]
        B = config.batch_size if config is not None else "B"
        ok = s.ndim == 2 and s.shape[1] == H and (config is None or s.shape[0] == config.batch_size)
        if not ok or s.dtype != dtype or not np.isfinite(s).all():
            raise CheckpointError(
                f"{where}: carried state carry.s has {s.dtype} {s.shape}, expected finite {dtype.name} ({B}, {H})"
            )
        if state.chunk == 0:
            raise CheckpointError(
                f"{where}: carry.s is present at state.chunk = 0, the start of a sequence, where the state is zero"
            )
        state.s = s

    history = _history(arrays, state, where)

    be = get_backend(backend)
    model = RNN.from_params(params, backend=be, dtype=dtype)
    model.init = mm.get("init", "custom")
    optimizer = None
    mo = meta.get("optimizer")
    optim_arrays = {k.removeprefix("optim."): a for k, a in arrays.items() if k.startswith("optim.")}
    if mo is not None:
        try:
            hyper = {k: v for k, v in mo.items() if k != "name"}
            optimizer = make_optimizer(mo["name"], model, **hyper)
            optimizer.load_state_dict(optim_arrays)
        except (KeyError, TypeError, InputError) as exc:
            raise CheckpointError(f"{where}: bad optimizer state ({exc})") from None
    elif optim_arrays:
        raise CheckpointError(f"{where} holds optimizer state but no optimizer description")
    return Checkpoint(
        model=model,
        optimizer=optimizer,
        vocab=vocab,
        data=meta.get("data"),
        config=config,
        state=state,
        history=history,
        meta=meta,
    )
