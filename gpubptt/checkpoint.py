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
save leaves any previous file untouched. Loading validates every name, shape and dtype before
building anything and raises CheckpointError (a ValueError) with what is wrong.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import write_atomic
from .backend import Backend, get_backend, to_numpy
from .data import Vocab
from .errors import InputError
from .model import RNN
from .optim import Optimizer, make_optimizer
from .train import History, TrainConfig, TrainState

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

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write checkpoint {str(path)!r}: directory {str(directory)!r} does not exist")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())  # the old file stays whole if anything fails
    return path


def _read(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, expected an .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise CheckpointError(f"{str(path)!r} is a single .npy array, not a gpubptt checkpoint (.npz)")
            return {k: z[k] for k in z.files}  # read every member now: CRC and format errors surface here
    except CheckpointError:
        raise
    except Exception as exc:  # any parse failure of an untrusted file: BadZipFile, bad CRC, bad .npy header...
        raise CheckpointError(
            f"{str(path)!r} is not a readable gpubptt checkpoint (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _meta(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    m = arrays.get("meta")
    if m is None or m.dtype.kind != "U" or m.shape != ():
        raise CheckpointError(f"{where} has no 'meta' entry: not a gpubptt checkpoint")
    try:
        meta = json.loads(str(m))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: 'meta' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a gpubptt checkpoint (format tag {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{where} has format version {meta.get('version')!r}; this gpubptt reads {VERSION}")
    for key in ("model", "state"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{where}: 'meta' lacks the {key!r} section")
    return meta


def load_checkpoint(path: str | os.PathLike[str], *, backend: str | Backend | None = "auto") -> Checkpoint:
    """Read and validate a checkpoint; build the model (and optimizer) on ``backend``.

    Raises CheckpointError naming the problem (missing, truncated, corrupt, wrong names, shapes or
    dtypes) before anything is built.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    arrays = _read(path)
    meta = _meta(arrays, where)
    mm = meta["model"]
    try:
        D, H, K = int(mm["input_size"]), int(mm["hidden_size"]), int(mm["output_size"])
        dtype, bias = np.dtype(mm["dtype"]), bool(mm["bias"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad model description in 'meta' ({exc})") from None
    if dtype.name not in ("float32", "float64"):
        raise CheckpointError(f"{where}: model dtype {dtype.name!r} is not float32 or float64")

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

    config = None
    if meta.get("config") is not None:
        try:
            config = TrainConfig(**meta["config"])
        except (TypeError, InputError) as exc:
            raise CheckpointError(f"{where}: bad training config ({exc})") from None

    ms = meta["state"]
    try:
        state = TrainState(step=int(ms["step"]), sequence=int(ms["sequence"]), chunk=int(ms["chunk"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad training position in 'meta' ({exc})") from None
    if "carry.s" in arrays:
        s = arrays["carry.s"]
        B = config.batch_size if config is not None else s.shape[0]
        if s.shape != (B, H) or s.dtype != dtype or not np.isfinite(s).all():
            raise CheckpointError(
                f"{where}: carried state has {s.dtype} {s.shape}, expected finite {dtype.name} ({B}, {H})"
            )
        state.s = s

    hist = {k.removeprefix("history."): a for k, a in arrays.items() if k.startswith("history.")}
    try:
        history = History.from_arrays(hist) if hist else History()
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: bad training history ({exc})") from None
    n, ne = len(history.step), len(history.eval_step)
    if not (len(history.loss) == len(history.grad_norm) == len(history.lr) == n) or not (
        len(history.eval_loss) == len(history.eval_accuracy) == ne
    ):
        raise CheckpointError(f"{where}: training history arrays have inconsistent lengths")

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
