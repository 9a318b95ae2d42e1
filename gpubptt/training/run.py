"""A training run from flat settings: build it new or from a checkpoint, save it, plot its loss curve.

This is what ``gpubptt train`` calls. Settings are the command's options by name (see ``DEFAULTS``);
a new run fills the missing ones from ``DEFAULTS``, a resumed run takes every one from the
checkpoint and refuses a given setting that contradicts it. A text file is stored by its absolute
path with its sha256, and a resume refuses a changed text unless told to accept it.

    >>> run = new_run({"task": "recall", "delay": 3, "hidden": 8}, backend="numpy", steps=10)
    >>> run.data.seq_len, run.model.hidden_size, run.config.chunk is None
    (5, 8, True)
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..backend import Backend, get_backend
from ..cells import NONLINEARITIES, cell_class, cell_names
from ..engine.memory import MAX_LAYERS
from ..engine.recompute import check_max_memory
from ..errors import InputError
from ..model import CELLS, INITS, RNN
from ..validation import check_bool
from ._optim_settings import LR_MAX, LR_RANGE
from .data import CopyTask, TextData, default_corpus, make_data, read_text
from .loop import SCHEDULES, History, TrainConfig, TrainState, optimizer_base_rate
from .optim import DEFAULT_LR, ON_NONFINITE, Optimizer, make_optimizer
from .record import Checkpoint, load_checkpoint, save_checkpoint
from .sample import check_predicts_ahead
from .sizing import INT_MAX, check_memory, schedule_note, total_steps

__all__ = ["DEFAULTS", "Run", "best_path", "check_layers", "new_run", "resume_run", "save_run", "total_steps"]

DEFAULTS: dict[str, Any] = {
    "task": "text",
    "data": None,  # a UTF-8 file; None: the built-in corpus
    "val_data": None,  # a UTF-8 file held out instead of the end of --data
    "val_fraction": 0.1,  # the part of the text held out (its end), without val_data
    "delay": 10,
    "symbols": 8,
    "copy_length": 5,
    "hidden": 256,
    "cell": "rnn",
    "layers": 1,
    "dropout": 0.0,
    "batch": 32,
    "chunk": None,  # text: TEXT_CHUNK, tasks: 0 (whole sequences)
    "truncate": None,
    "dtype": "float32",
    "bias": True,
    "init": "wildml",
    "nonlinearity": "tanh",
    "optimizer": "adam",
    "lr": None,  # per optimizer: DEFAULT_LR
    "momentum": 0.0,
    "weight_decay": 0.0,  # decoupled, as AdamW (gpubptt.training.optim)
    "clip": 5.0,  # 0: off
    "schedule": "constant",
    "warmup": 0,
    "seed": 0,
    "on_nonfinite": "raise",
}
DEFAULT_STEPS = 3000
DEFAULT_EVAL_EVERY = 250  # steps between held-out evaluations (and checkpoint saves)
TEXT_CHUNK = 64  # the default chunk of the text task; the tasks train on whole sequences (0)


def best_path(checkpoint: str | Path) -> Path:
    """Where a run saved at ``checkpoint`` keeps its best held-out model: ``ck.npz`` → ``ck.best.npz``.

    A complete checkpoint of the run at its lowest held-out loss (``History.best``), written beside
    the last one whenever an evaluation improves on it, so ``sample``, ``vanish`` and ``load_checkpoint``
    read it as any other.
    """
    p = Path(checkpoint)
    return p.with_name(f"{p.stem}.best{p.suffix}") if p.suffix else p.with_name(f"{p.name}.best")


@dataclass
class Run:
    """Everything a training run needs; ``state`` and ``history`` are where it stands."""

    model: RNN
    data: TextData | CopyTask
    optimizer: Optimizer
    config: TrainConfig
    state: TrainState
    history: History
    #: what a caller should tell its user about how the run continues (``resume_run``: a stretched schedule)
    notes: tuple[str, ...] = ()


_PHI_CELLS = tuple(c for c in CELLS if cell_class(c).takes_nonlinearity)  # the cells with a nonlinearity option
# which settings each choice uses: a given setting that the run would ignore is refused, by name
_APPLIES = {
    "delay": ("task", ("copy", "recall"), "--task copy or recall"),
    "symbols": ("task", ("copy", "recall"), "--task copy or recall"),
    "copy_length": ("task", ("copy",), "--task copy (recall remembers one symbol)"),
    "data": ("task", ("text",), "--task text only"),
    "val_data": ("task", ("text",), "--task text only (copy and recall hold out a fixed batch of fresh sequences)"),
    "val_fraction": ("task", ("text",), "--task text only (copy and recall hold out a fixed batch of fresh sequences)"),
    "momentum": ("optimizer", ("sgd",), "--optimizer sgd (adam and adagrad keep their own statistics)"),
    "nonlinearity": (
        "cell",
        _PHI_CELLS,
        f"--cell {' or '.join(_PHI_CELLS)} (the GRU's and LSTM's gates use σ and tanh)",
    ),
}
_CHOICES = {
    "task": ("text", "copy", "recall"),
    "cell": CELLS,
    "optimizer": tuple(DEFAULT_LR),
    "schedule": SCHEDULES,
    "init": INITS,
    "nonlinearity": NONLINEARITIES,
    "on_nonfinite": ON_NONFINITE,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _check_int(flag: str, v: Any, lo: int, note: str = "") -> None:
    """InputError unless v is None or an int in [lo, INT_MAX] (what a checkpoint can store)."""
    if v is None:
        return
    if not (_is_int(v) and v >= lo):
        raise InputError(f"{flag} must be an int ≥ {lo}{note}, got {v!r}")
    if v > INT_MAX:
        raise InputError(f"{flag} must be at most {INT_MAX} (a checkpoint stores it as int64), got {v}")


def check_layers(layers: Any, flag: str = "--layers") -> None:
    """InputError for more layers than a checkpoint holds (``MAX_LAYERS``): the one limit of every command."""
    if _is_int(layers) and layers > MAX_LAYERS:
        raise InputError(
            f"{flag} must be at most {MAX_LAYERS}, got {layers}: {layers} is above the limit of {MAX_LAYERS} layers "
            "(the most a model or a checkpoint holds)"
        )


def _check_settings(
    settings: Mapping[str, Any], st: Mapping[str, Any], *, steps: Any, epochs: Any, eval_every: Any
) -> None:
    """InputError naming the flag (``--clip``, not ``max_norm``) of the first bad or inapplicable setting."""
    for name, choices in _CHOICES.items():
        choices = cell_names() if name == "cell" else choices  # a cell registered since import counts too
        if st[name] not in choices:
            raise InputError(f"unknown {_flag(name)} {st[name]!r}; expected one of {', '.join(choices)}")
    try:
        dtype = np.dtype(st["dtype"]).name
    except TypeError:
        dtype = None
    if dtype not in ("float32", "float64"):
        raise InputError(f"unknown --dtype {st['dtype']!r}; expected float32 or float64")
    for name, (on, uses, where) in _APPLIES.items():
        if settings.get(name) is not None and st[on] not in uses:
            raise InputError(f"{_flag(name)} applies to {where}, not {_flag(on)} {st[on]}")
    if settings.get("val_data") is not None and settings.get("val_fraction") is not None:
        raise InputError("give --val-data (a held-out file) or --val-fraction (the end of --data held out), not both")
    if not (_is_number(st["val_fraction"]) and 0 < st["val_fraction"] < 1):
        raise InputError(f"--val-fraction must be a number in (0, 1), got {st['val_fraction']!r}")
    if not (_is_number(st["weight_decay"]) and st["weight_decay"] >= 0):
        raise InputError(f"--weight-decay must be a finite number ≥ 0, got {st['weight_decay']!r}")
    if epochs is not None and steps is not None:
        raise InputError("give --steps or --epochs, not both")
    if epochs is not None and st["task"] != "text":
        raise InputError(
            f"--epochs applies to --task text only (passes over the training text); use --steps for {st['task']}"
        )
    ints = {
        "hidden": 1,
        "layers": 1,
        "batch": 1,
        "chunk": 0,
        "truncate": 0,
        "warmup": 0,
        "seed": 0,
        "symbols": 2,
        "copy_length": 1,
    }
    for name, lo in {**ints, "delay": 0}.items():
        _check_int(_flag(name), st[name], lo, " (0: whole sequences)" if name == "chunk" else "")
    check_layers(st["layers"])  # the format's cap, before training rather than at the first save
    _check_int("--steps", steps, 1)
    _check_int("--eval-every", eval_every, 0)
    if epochs is not None and not (_is_number(epochs) and epochs > 0):
        raise InputError(f"--epochs must be a finite number > 0, got {epochs!r}")
    if st["lr"] is not None and not (_is_number(st["lr"]) and 0 < st["lr"] <= LR_MAX):
        raise InputError(f"--lr must be a finite number in (0, {LR_MAX:g}], got {st['lr']!r}; {LR_RANGE}")
    if not (_is_number(st["clip"]) and st["clip"] >= 0):
        raise InputError(f"--clip must be a finite number ≥ 0 (0: off), got {st['clip']!r}")
    if not (_is_number(st["momentum"]) and 0 <= st["momentum"] < 1):
        raise InputError(f"--momentum must be a number in [0, 1), got {st['momentum']!r}")
    if not (_is_number(st["dropout"]) and 0 <= st["dropout"] < 1):
        raise InputError(f"--dropout must be a number in [0, 1), got {st['dropout']!r}")
    if st["dropout"] > 0 and st["layers"] == 1:
        raise InputError(
            f"--dropout {st['dropout']} applies between layers (to the outputs of every layer but the last): "
            "give --layers 2 or more"
        )


def _check_task_chunk(data: TextData | CopyTask, chunk: int | None, *, resumed: bool = False) -> None:
    """InputError for a copy/recall ``--chunk`` that does not divide the sequence: the loop trains whole chunks
    only, and the steps it would drop are the last ones, where the task's targets are. ``resumed``: the chunk is a
    checkpoint's (written before the check), which a resumed run keeps: say that only a new run can fix it."""
    dropped = data.dropped_steps(chunk) if data.kind != "text" else 0  # as CopyTask.check_batch, worded for flags
    if dropped:
        why = (
            f"--chunk {chunk} does not divide the {data.kind} task's sequence of {data.seq_len} steps: its last "
            f"{dropped}, where the targets are, would never train"
        )
        if resumed:
            raise InputError(
                f"the checkpoint's {why}, and a resumed run keeps its --chunk: this run cannot continue; start a new "
                "run with --chunk 0 (whole sequences) or a divisor of the length"
            )
        raise InputError(f"{why}; give --chunk 0 (whole sequences) or a divisor of the length")


def _recorded(key: str, stored: Mapping[str, Any]) -> str:
    """What the checkpoint recorded for the setting ``key``, in words (where it recorded none: what it used)."""
    value = stored[key]
    if value is not None:
        return f"the checkpoint ({value})"
    if key == "data":
        return "the checkpoint, which trained on the built-in corpus (no --data)"
    if key == "val_data" and stored.get("val_fraction") is not None:
        return f"the checkpoint, which held out --val-fraction {stored['val_fraction']} of its text (no --val-data)"
    if key == "val_fraction" and stored.get("val_data") is not None:
        return f"the checkpoint, which held out --val-data {stored['val_data']} (no --val-fraction)"
    return "the checkpoint, which has none"


def new_run(
    settings: Mapping[str, Any],
    *,
    backend: str | Backend | None = "auto",
    steps: int | None = None,
    epochs: float | None = None,
    eval_every: int = DEFAULT_EVAL_EVERY,
    max_memory: int | None = None,
) -> Run:
    """A fresh run from ``settings`` (missing or None keys from ``DEFAULTS``); InputError on a bad setting.
    ``max_memory``: the training calls' budget in bytes (``--max-memory``), which bounds their workspaces in the
    memory check (they recompute to fit it).

    Every setting is checked first, and the message names it as the command's flag (``--clip``). A
    setting the run would not use is refused: ``delay``/``symbols`` with the text task, ``copy_length``
    with recall, ``data`` with a task, ``momentum`` with an optimizer other than SGD, ``epochs`` with a
    task. InsufficientMemoryError (an InputError) when the run cannot fit in the backend's memory.
    """
    check_max_memory(max_memory)
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise InputError(f"unknown settings {unknown}; expected some of {sorted(DEFAULTS)}")
    st = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None}}
    _check_settings(settings, st, steps=steps, epochs=epochs, eval_every=eval_every)
    if st["task"] == "text":
        text = default_corpus() if st["data"] is None else read_text(st["data"])
        source = "builtin" if st["data"] is None else os.path.abspath(st["data"])  # a resume may run elsewhere
        if st["val_data"] is None:
            data = TextData(text, source=source, val_fraction=float(st["val_fraction"]))
        else:
            val_text, val_source = read_text(st["val_data"]), os.path.abspath(st["val_data"])
            data = TextData(text, source=source, val_fraction=None, val_text=val_text, val_source=val_source)
    elif st["task"] in ("copy", "recall"):
        k = 1 if st["task"] == "recall" else st["copy_length"]
        data = CopyTask(symbols=st["symbols"], length=k, delay=st["delay"])
    else:
        raise InputError(f"unknown task {st['task']!r}; expected text, copy or recall")
    chunk = st["chunk"]
    if chunk is None:
        chunk = TEXT_CHUNK if st["task"] == "text" else 0
    _check_task_chunk(data, chunk)
    lr = st["lr"] if st["lr"] is not None else DEFAULT_LR[st["optimizer"]]
    config = TrainConfig(
        steps=1,
        batch_size=st["batch"],
        chunk=chunk or None,
        truncate=st["truncate"],
        max_norm=st["clip"] or None,
        lr=lr,
        schedule=st["schedule"],
        warmup=st["warmup"],
        eval_every=eval_every,
        seed=st["seed"],
    )
    config.steps = total_steps(data, config, steps=steps, epochs=epochs, default=DEFAULT_STEPS)
    config = TrainConfig(**vars(config))  # validate the final values (and take NumPy ints as Python's)
    data.check_batch(config.batch_size, config.chunk or 1)
    be = get_backend(backend)
    check_memory(st, data, config, be, max_memory)  # before the weights are drawn: refuse what cannot fit
    model = RNN(
        data.input_size,
        st["hidden"],
        data.output_size,
        backend=be,
        dtype=st["dtype"],
        bias=st["bias"],
        init=st["init"],
        cell=st["cell"],
        # as given, or None: the cell's own default (tanh for rnn, relu for indrnn)
        nonlinearity=settings.get("nonlinearity") if cell_class(st["cell"]).takes_nonlinearity else None,
        num_layers=st["layers"],
        dropout=float(st["dropout"]),
        seed=st["seed"],
    )
    optimizer = make_optimizer(
        st["optimizer"], model, lr=lr, momentum=st["momentum"], on_nonfinite=st["on_nonfinite"],
        weight_decay=float(st["weight_decay"]),
    )  # fmt: skip
    return Run(model, data, optimizer, config, TrainState(), History())


def settings_of(ck: Checkpoint) -> dict[str, Any]:
    """The settings (keys of ``DEFAULTS``) that a checkpoint's run was made with."""
    cfg, data, mo, mm = ck.config, ck.data or {}, ck.meta.get("optimizer") or {}, ck.meta["model"]
    return {
        "task": data.get("kind"),
        "data": None if data.get("source", "builtin") == "builtin" else data.get("source"),
        "val_data": data.get("val_source"),
        "val_fraction": data.get("val_fraction"),
        "delay": data.get("delay"),
        "symbols": data.get("symbols"),
        "copy_length": data.get("length"),
        "hidden": mm["hidden_size"],
        "cell": cell_class(mm.get("cell", "elman"), recorded=True).option,
        "layers": mm.get("num_layers", 1),
        "dropout": mm.get("dropout", 0.0),
        "batch": cfg.batch_size,
        "chunk": cfg.chunk or 0,
        "truncate": cfg.truncate,
        "dtype": mm["dtype"],
        "bias": mm["bias"],
        "init": mm.get("init"),
        "nonlinearity": mm.get("nonlinearity", "tanh"),
        "optimizer": mo.get("name"),
        "lr": cfg.lr,
        "momentum": mo.get("momentum", 0.0),
        "weight_decay": mo.get("weight_decay", 0.0),
        "clip": cfg.max_norm or 0.0,
        "schedule": cfg.schedule,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "on_nonfinite": mo.get("on_nonfinite"),
    }


def _text_path(source: str, checkpoint: Path) -> Path:
    """Where a checkpoint's training text is: new runs store its absolute path. A relative path (from
    an older gpubptt) is taken from the current folder, as then, or else from the checkpoint's folder."""
    p = Path(source)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), checkpoint.parent):
        if (base / p).is_file():
            return Path(os.path.abspath(base / p))
    return Path(os.path.abspath(p))  # nowhere: read_text names it


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: compare the absolute paths
        return os.path.abspath(a) == os.path.abspath(b)


def _check_same_text(recorded: Mapping[str, Any], text: str, *, accept: bool, source: str | None = None) -> None:
    """InputError when the text is not the one the checkpoint was trained on (by sha256 and size), unless ``accept``.
    ``source``: where the text was read, where that is not the recorded file (it moved: ``--data`` names it).

    Checkpoints from before the digest was recorded carry none, and are not checked.
    """
    if "sha256" not in recorded or accept:
        return
    raw = text.encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if digest != recorded["sha256"]:
        name = "the built-in corpus" if recorded["source"] == "builtin" else f"text file {recorded['source']!r}"
        if source is not None and source != recorded["source"]:
            name = f"text file {source!r}, given for the checkpoint's {recorded['source']!r} (which has moved),"
            raise InputError(
                f"{name} is not the text the run was trained on: that had {recorded['size_bytes']} bytes (sha256 "
                f"{recorded['sha256'][:12]}…), this has {len(raw)} bytes (sha256 {digest[:12]}…); pass "
                "--accept-changed-data (accept_changed_data=True) to resume training on it"
            )
        raise InputError(
            f"{name} has changed since the checkpoint was saved: it had {recorded['size_bytes']} bytes "
            f"(sha256 {recorded['sha256'][:12]}…), now {len(raw)} bytes (sha256 {digest[:12]}…); pass "
            "--accept-changed-data (accept_changed_data=True) to resume training on the new text"
        )


def resume_run(
    path: str | Path,
    *,
    given: Mapping[str, Any] | None = None,
    backend: str | Backend | None = "auto",
    steps: int | None = None,
    epochs: float | None = None,
    eval_every: int | None = None,
    accept_changed_data: bool = False,
    max_memory: int | None = None,
) -> Run:
    """The run saved in the checkpoint at ``path``, to continue up to ``steps`` (default: its own), evaluating
    every ``eval_every`` steps (default: as the run was saved with).

    ``given``: settings the caller asked for; each must equal the checkpoint's (InputError naming
    the first that differs; ``data`` is the same when it names the same file, by any path).
    CheckpointError when the file is missing, corrupt or holds no run. InputError when the training
    text's sha256 differs from the one recorded, unless ``accept_changed_data``; the run then
    continues on the new text and the next save records its digest. InsufficientMemoryError when
    the run cannot fit in the backend's memory (as ``new_run``, ``max_memory`` as there).
    """
    accept_changed_data = check_bool(accept_changed_data, "accept_changed_data")  # "no" would read as true
    check_max_memory(max_memory)
    ck = load_checkpoint(path, backend=backend)
    if ck.optimizer is None or ck.config is None or ck.data is None or "kind" not in ck.data:
        raise InputError(f"{str(path)!r} holds a model but no training run to resume")
    if ck.data["kind"] == "text":
        check_predicts_ahead(ck.model)  # the same rule as `sample`: the reverse direction reads the targets
    stored = settings_of(ck)
    spec = ck.data
    if stored["data"] is not None:  # a text file, by its absolute path from here on
        stored["data"] = str(_text_path(stored["data"], Path(path)))
        spec = {**ck.data, "source": stored["data"]}
    if stored["val_data"] is not None:
        stored["val_data"] = str(_text_path(stored["val_data"], Path(path)))
        spec = {**spec, "val_source": stored["val_data"]}
    _check_int("--steps", steps, 1)
    if epochs is not None and steps is not None:
        raise InputError("give --steps or --epochs, not both")
    moved: dict[str, str] = {}  # "data"/"val_data": the file given for a recorded one that no longer exists
    given = dict(given or {})
    one = given.get("copy_length") == 1 and given.get("task", "copy") == "copy"
    if one and stored["task"] == "recall":  # the copy of one symbol, recorded as recall: its own options, either way
        given.pop("copy_length")
        if "task" in given:
            given["task"] = "recall"
    for k, v in given.items():
        if k not in stored:
            raise InputError(f"unknown setting {k!r}")
        if k in _APPLIES and stored[_APPLIES[k][0]] not in _APPLIES[k][1]:  # as a new run says it, not "(None)"
            on, _, where = _APPLIES[k]
            raise InputError(f"{_flag(k)} applies to {where}, not {_flag(on)} {stored[on]}")
        if k in ("data", "val_data"):
            same = v is not None and stored[k] is not None and _same_file(v, stored[k])
            if not same and v is not None and stored[k] is not None and not Path(stored[k]).exists():
                flag = "--" + k.replace("_", "-")
                if not Path(v).exists():
                    raise InputError(f"{flag} {v} does not exist")
                if ("sha256" if k == "data" else "val_sha256") not in ck.data and not accept_changed_data:
                    raise InputError(
                        f"{flag} {v}: the checkpoint records no digest of its text to check this one against; "
                        "pass --accept-changed-data to resume on it"
                    )
                stored[k] = str(Path(os.path.abspath(v)))  # the recorded file moved: this one, if its digest matches
                moved[k] = stored[k]
                spec = {**spec, "source" if k == "data" else "val_source": stored[k]}
                same = True
        else:
            same = v == stored[k] or (k == "lr" and stored[k] is None)  # a file without the base rate takes one
        if not same:
            flag = "--" + k.replace("_", "-")
            raise InputError(f"{flag} {v} differs from {_recorded(k, stored)}; a resumed run keeps its settings")
    text = val_text = None
    for key, flag in (("source", "--data"), ("val_source", "--val-data")):
        where = spec.get(key)
        if spec["kind"] == "text" and where not in (None, "builtin") and not Path(where).exists():
            what = "training" if key == "source" else "held-out"
            raise InputError(
                f"the checkpoint's {what} text {where!r} does not exist: if it moved, pass {flag} with its new path "
                "(its sha256 is checked against the one recorded)"
            )
    if spec["kind"] == "text":
        text = default_corpus() if spec["source"] == "builtin" else read_text(spec["source"])
        _check_same_text(ck.data, text, accept=accept_changed_data, source=moved.get("data"))
        if spec.get("val_source") is not None:
            val_text = read_text(spec["val_source"])
            held_out = {"source": ck.data["val_source"], "sha256": ck.data["val_sha256"],
                        "size_bytes": ck.data["val_size_bytes"]}  # fmt: skip
            _check_same_text(held_out, val_text, accept=accept_changed_data, source=moved.get("val_data"))
    try:
        data = make_data(spec, text=text, vocab=ck.vocab, val_text=val_text)
    except InputError as exc:
        if ck.vocab is None or "vocabulary" not in str(exc):
            raise
        files = " or ".join(repr(spec[k]) for k in ("source", "val_source") if spec.get(k) not in (None, "builtin"))
        raise InputError(
            f"{files or 'the training text'}: {exc}; a resumed model keeps the vocabulary it was trained with, so the "
            "changed text may only use its characters"
        ) from None
    _check_task_chunk(data, ck.config.chunk, resumed=True)  # a file from before the check: said for a resumed run
    data.check_batch(ck.config.batch_size, ck.config.chunk or 1)  # a changed text may be too short now
    total = total_steps(data, ck.config, steps=steps, epochs=epochs, default=ck.config.steps)
    if eval_every is not None:
        _check_int("--eval-every", eval_every, 0)
    kept = ck.config.eval_every if eval_every is None else eval_every
    config = TrainConfig(**{**vars(ck.config), "steps": total, "eval_every": kept})
    if config.lr is None:  # saved from a configuration that named no base rate (TrainConfig(lr=None)), before train()
        at = ck.state.step
        lr = (given or {}).get("lr")
        config.lr = float(lr) if lr is not None else optimizer_base_rate(ck.optimizer, at, config)
        if config.lr is None:
            raise InputError(
                f"{str(path)!r} records no base learning rate (its config.lr is null) and its run is at step {at} of "
                f"a {config.schedule} schedule{' with warm-up' if config.warmup else ''}: give --lr, the base rate"
            )
    check_memory(stored, data, config, ck.model.backend, max_memory)  # a run resumed elsewhere may not fit there
    note = schedule_note(config, ck.config.steps, ck.state.step)
    return Run(ck.model, data, ck.optimizer, config, ck.state, ck.history, notes=() if note is None else (note,))


def save_run(path: str | Path, run: Run, *, copies: tuple[str | Path, ...] = ()) -> Path:
    """Checkpoint the run atomically at ``path``, and in each of ``copies`` with it: all replaced, or none (see
    ``gpubptt.training.record``)."""
    return save_checkpoint(
        path,
        run.model,
        optimizer=run.optimizer,
        vocab=getattr(run.data, "vocab", None),
        data=run.data.spec(),
        config=run.config,
        state=run.state,
        history=run.history,
        copies=copies,
    )
