"""The training record of a checkpoint: optimizer state, vocabulary, data description, training
configuration, position and history, stored beside the model's state by the file format
(``gpubptt.training.checkpoint``), which neither reads nor imports any of it.

``save_checkpoint`` and ``load_checkpoint`` are the training application's checkpoints: the record is
handed to the file format through ``SCHEMA`` (its sections of ``meta``, its entries and their checks)
and read back here, every field checked (type and range; the position against the configuration and
data) with one line per problem, before anything is resumed.

Entries of the record (every one a plain NumPy array):

    optim.t  optim.<slot>.<param>   the optimizer state (optim.base_lr, optim.scheduled_lr, optim.lr: its rates)
    vocab           (K,) int32 code points (text models)
    carry.s         (B, H), or (L·dirs, B, H) for a stack: the state carried into the next chunk (mid-sequence only)
    carry.c         an LSTM's carried cell state c, shaped as carry.s (always with it, for an LSTM only)
    history.*       per-step loss, gradient norm, lr; evaluation steps, losses, accuracies
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import check_targets
from ..backend import Backend, to_numpy
from ..errors import CheckpointError, InputError
from ..model import RNN
from .checkpoint import read_model_state, write_model_state
from .checkpoint_meta import SIZE_MAX, Fields, RecordSchema, is_number, raise_problems, show
from .data import TASKS, Vocab
from .loop import SCHEDULES, History, TrainConfig, TrainState
from .optim import ON_NONFINITE, OPTIMIZERS, Optimizer, make_optimizer

__all__ = [
    "SCHEMA",
    "Checkpoint",
    "CheckpointError",
    "check_history",
    "checkpoint_bytes",
    "load_checkpoint",
    "save_checkpoint",
]


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
    copies: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Write a checkpoint to ``path`` atomically; return the path. ``copies``: further files to hold the same
    checkpoint (a best model's file beside the last one), written with it: every file is replaced, or none.

    Shapes as in the model: U (H, D), W (H, H), V (K, H), b (H,), c (K,); carried state (B, H).
    The description, history, parameters, optimizer state and carried state are checked as
    ``load_checkpoint`` checks them (non-finite values included), so a file it would refuse is never
    written (CheckpointError, and any existing file stays as it was). NumPy scalars in the description
    (a configuration field set to np.int64, say) are stored as the Python numbers they hold.

    ``copies`` is a list or tuple of paths (one path given as a str is refused: InputTypeError); a target
    that is a folder is refused (IsADirectoryError) before anything is written.
    """
    copies = check_targets(path, copies)
    state = TrainState() if state is None else state
    sections = {
        "optimizer": None if optimizer is None else {"name": optimizer.name, **optimizer.hyperparameters()},
        "data": data,
        "config": None if config is None else asdict(config),
        "state": {"step": state.step, "sequence": state.sequence, "chunk": state.chunk},
    }
    arrays: dict[str, np.ndarray] = {}
    if optimizer is not None:
        for k, a in optimizer.state_dict().items():
            arrays[f"optim.{k}"] = _host(a)
    if vocab is not None:
        arrays["vocab"] = vocab.to_array()
    if isinstance(state.s, tuple):  # an LSTM's (h, c)
        arrays["carry.s"], arrays["carry.c"] = _host(state.s[0]), _host(state.s[1])
    elif state.s is not None:
        arrays["carry.s"] = _host(state.s)
    for k, a in (History() if history is None else history).to_arrays().items():
        arrays[f"history.{k}"] = a
    return write_model_state(
        path, model, SCHEMA, sections, arrays, check=lambda all_arrays, where: check_history(all_arrays, state, where),
        copies=copies,
    )  # fmt: skip


#: What a checkpoint holds beyond its arrays' and its description's bytes: the zip archive's end record, and per
#: member its zip entries and .npy header (254 bytes measured on 28-member files)
CHECKPOINT_OVERHEAD = 1 << 10
MEMBER_OVERHEAD = 256
#: the description's model section (sizes, cell and its options, dtype, …): at most this many characters
MODEL_DESCRIPTION = 512


def checkpoint_bytes(
    model: RNN,
    *,
    optimizer: Optimizer,
    vocab: Vocab | None,
    data: dict[str, Any],
    config: TrainConfig,
    state: TrainState,
    history: History,
) -> int:
    """About the size of the file ``save_checkpoint`` writes for these arguments once the run reaches
    ``config.steps``, counted at or a little above (up to about a third for the smallest files): parameters,
    optimizer state (every entry of its ``state_dict``), a carried state (2·L·dirs·B·H, counted whether or not the
    run carries one), the history held and what the steps left add, the vocabulary, and the description (a text
    member, 4 bytes per character of its JSON: the data section holds the text files' paths and digests). Arrays
    are stored uncompressed, so their bytes are the file's, give or take the headers."""
    entries = optimizer.state_dict()
    size = sum(int(a.nbytes) for a in model.params.values()) + sum(int(a.nbytes) for a in entries.values())
    dirs = 2 if model.bidirectional else 1
    size += 2 * model.num_layers * dirs * config.batch_size * model.hidden_size * model.dtype.itemsize  # (h, c)
    left = max(0, config.steps - state.step)
    evals = len(history.eval_step) + (left // config.eval_every if config.eval_every else 0) + 2  # the last, a best
    steps = len(history.step) + left
    size += 8 * (4 * steps + 3 * evals + 1)  # step, loss, grad_norm, lr; eval_step, eval_loss, eval_accuracy; skipped
    size += 0 if vocab is None else int(vocab.to_array().nbytes)
    sections = {"data": data, "config": asdict(config), "optimizer": optimizer.hyperparameters()}
    size += 4 * (len(json.dumps(sections, default=str)) + MODEL_DESCRIPTION)
    members = len(model.params) + len(entries) + 2 + len(History().to_arrays()) + 2  # carry, history, vocab, meta
    return size + CHECKPOINT_OVERHEAD + MEMBER_OVERHEAD * members


def _check_optimizer(f: Fields, o: dict[str, Any]) -> None:
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
        if not (isinstance(b, list) and len(b) == 2 and all(is_number(x) and 0 <= x < 1 for x in b)):
            f.bad("optimizer.betas", b, "a list of two numbers in [0, 1)")


def _check_data(f: Fields, d: dict[str, Any]) -> None:
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
    ok = f.integer("data.symbols", d["symbols"], 2, SIZE_MAX)
    ok &= f.integer("data.length", d["length"], 1, SIZE_MAX)
    ok &= f.integer("data.delay", d["delay"], 0, SIZE_MAX)
    if ok and (d["kind"] == "recall") != (d["length"] == 1):
        f.bad("data.kind", d["kind"], f"{'recall' if d['length'] == 1 else 'copy'} for data.length = {d['length']}")


def _check_config(f: Fields, c: dict[str, Any]) -> None:
    if not f.keys("config", c, tuple(TrainConfig.__dataclass_fields__)):
        return
    f.integer("config.steps", c["steps"], 1)
    f.integer("config.batch_size", c["batch_size"], 1, SIZE_MAX)
    f.integer("config.chunk", c["chunk"], 1, SIZE_MAX, null=True)
    f.integer("config.truncate", c["truncate"], 0, SIZE_MAX, null=True)
    f.number("config.max_norm", c["max_norm"], 0, lo_open=True, null=True)
    f.number("config.lr", c["lr"], 0, lo_open=True, null=True)  # null: the optimizer's own rate
    f.choice("config.schedule", c["schedule"], SCHEDULES)
    f.integer("config.warmup", c["warmup"], 0)
    f.integer("config.eval_every", c["eval_every"], 0)
    f.integer("config.seed", c["seed"], 0)


def _check_state(f: Fields, s: dict[str, Any]) -> None:
    if f.keys("state", s, ("step", "sequence", "chunk")):
        for k in ("step", "sequence", "chunk"):
            f.integer(f"state.{k}", s[k], 0)


def _check_consistency(f: Fields, meta: dict[str, Any]) -> None:
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
    raise_problems(where, problems)
    return History.from_arrays(hist)


def _check_sections(f: Fields, meta: dict[str, Any]) -> None:
    """The record's sections of ``meta``, each by its check, then (when all is well) across them and the model."""
    checks = {"optimizer": _check_optimizer, "data": _check_data, "config": _check_config, "state": _check_state}
    for key, check in checks.items():
        if key in meta and f.section(key, meta[key], null=key != "state") and meta[key] is not None:
            check(f, meta[key])
    if not f.problems:
        _check_consistency(f, meta)


def _owns(entry: str, cell: Any) -> bool:
    """Whether an archive entry is the record's: optimizer state, history, vocabulary, carried state."""
    carried = ("carry.s", "carry.c") if cell.extra_state else ("carry.s",)  # an LSTM carries the tuple (h, c)
    return entry.startswith(("optim.", "history.")) or entry == "vocab" or entry in carried


#: The training record as the file format sees it: its sections of meta, its entries and their checks.
SCHEMA = RecordSchema(
    required=("state",),
    optional=("optimizer", "data", "config"),
    check_sections=_check_sections,
    owns=_owns,
    finite=("optim.", "carry."),
)


def load_checkpoint(path: str | os.PathLike[str], *, backend: str | Backend | None = "auto") -> Checkpoint:
    """Read and validate a checkpoint; build the model (and optimizer) on ``backend``.

    Raises CheckpointError naming the problem (missing, truncated, corrupt, wrong names, shapes or
    dtypes) before anything is returned.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    read = read_model_state(path, SCHEMA, backend=backend)
    model, meta, arrays = read.model, read.meta, read.arrays
    D, H, K, dtype = model.input_size, model.hidden_size, model.output_size, model.dtype
    n_states = model.num_layers * (2 if model.bidirectional else 1)
    tupled = bool(model.cell.extra_state)  # an LSTM carries the tuple (h, c)

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
        raise CheckpointError(f"{where}: data.kind = {show(kind)} is not text, yet there is a 'vocab' entry")

    config = None
    if meta.get("config") is not None:
        try:
            config = TrainConfig(**meta["config"])
        except (TypeError, InputError) as exc:
            raise CheckpointError(f"{where}: bad training config ({exc})") from None

    ms = meta["state"]  # validated by _meta: ints ≥ 0
    state = TrainState(step=ms["step"], sequence=ms["sequence"], chunk=ms["chunk"])
    if tupled and ("carry.s" in arrays) != ("carry.c" in arrays):
        have, lack = ("carry.s", "carry.c") if "carry.s" in arrays else ("carry.c", "carry.s")
        raise CheckpointError(f"{where}: {have} without {lack}: an LSTM carries the tuple (h, c), both or neither")
    carried = []
    for name in ("carry.s", "carry.c"):
        if name not in arrays:
            continue
        s = arrays[name]
        B = config.batch_size if config is not None else "B"
        lead = () if n_states == 1 else (n_states,)  # one recurrence: (B, H); a stack: torch's (L·dirs, B, H)
        ok = s.ndim == len(lead) + 2 and s.shape[:-2] == lead and s.shape[-1] == H
        ok = ok and (config is None or s.shape[-2] == config.batch_size)
        if not ok or s.dtype != dtype or not np.isfinite(s).all():
            want = ", ".join(map(str, (*lead, B, H)))
            raise CheckpointError(
                f"{where}: carried state {name} has {s.dtype} {s.shape}, expected finite {dtype.name} ({want})"
            )
        if state.chunk == 0:
            raise CheckpointError(
                f"{where}: {name} is present at state.chunk = 0, the start of a sequence, where the state is zero"
            )
        carried.append(s)
    if carried:
        state.s = tuple(carried) if tupled else carried[0]

    history = check_history(arrays, state, where)

    optimizer = None
    mo = meta.get("optimizer")
    optim_arrays = {k.removeprefix("optim."): a for k, a in arrays.items() if k.startswith("optim.")}
    if mo is not None:
        try:
            hyper = {k: v for k, v in mo.items() if k != "name"}
            unset_eps = hyper.get("eps") == 0  # written before eps had to be > 0: it loads as it was saved
            optimizer = make_optimizer(mo["name"], model, **{**hyper, **({"eps": 1.0} if unset_eps else {})})
            if unset_eps:
                optimizer.eps = 0.0
            optimizer.load_state_dict(optim_arrays)
            config_lr = (meta.get("config") or {}).get("lr")
            if "base_lr" not in optim_arrays and config_lr is not None:  # a file from before the base was kept:
                optimizer.base_lr = float(config_lr)  # the run's own base rate, not the last rate it scheduled
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
