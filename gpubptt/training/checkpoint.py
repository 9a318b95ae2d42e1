"""The checkpoint file format: the model's state (its architecture record and parameters) and, beside it, a
training record (optimizer state, vocabulary, configuration, progress, history) in one .npz.

This module reads and writes the model's part and stores the record without interpreting it: the
training application declares its record's sections and entries and their checks through a
``RecordSchema`` and reads it back itself (``gpubptt.training.record``: ``save_checkpoint`` and
``load_checkpoint``), so the file format imports no training code.

Layout of the archive (every entry a plain NumPy array, so it loads with ``allow_pickle=False``):

    meta            0-d str: JSON with the format tag and version, the model (sizes, dtype, bias,
                    init and, from version 2, the architecture: cell, nonlinearity, layers,
                    directions), optimizer, data, training config and position (step, sequence, chunk)
    param.U  param.W  param.V  [param.b  param.c]       the model, in its dtype
    optim.t  optim.<slot>.<param>                        the optimizer state (and optim.base_lr,
                                                         optim.scheduled_lr: its rates, version 3; optim.lr,
                                                         the next step's, version 4)
    vocab           (K,) int32 code points (text models)
    carry.s         (B, H), or (L·dirs, B, H) for a stack: the state carried into the next chunk (mid-sequence only)
    carry.c         an LSTM's carried cell state c, shaped as carry.s (always with it, for an LSTM only)
    history.*       per-step loss, gradient norm, lr; evaluation steps, losses, accuracies

Arrays are always stored as host NumPy arrays, so a checkpoint written on CuPy loads on NumPy and
back. Writing is atomic: a temporary file in the same directory, flushed and fsync'ed, then
``os.replace``'d over the target, so a crash never leaves a half-written checkpoint and a failed
save leaves any previous file untouched. Loading validates every name, shape and dtype, and every
field of ``meta`` (type and range: ints are JSON ints, flags JSON booleans, sections objects or
null; the training position fits the configuration and data), before building anything, and
raises CheckpointError (a ValueError) with one line per problem, naming the field, its value and
what was expected (``checkpoint_meta``). Nothing is ever unpickled, and no message suggests it.
Files of every version in ``checkpoint_meta.READS`` load; saving writes ``VERSION``.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._io import check_targets, write_atomic
from ..backend import Backend, get_backend, to_numpy
from ..cells import cell_class, cell_names, make_cell
from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from ..model import RNN
from ..params import param_shapes
from .checkpoint_meta import FORMAT, VERSION, RecordSchema, check_meta, show

__all__ = ["FORMAT", "VERSION", "CheckpointError", "ModelState", "read_model_state", "write_model_state"]


@dataclass
class ModelState:
    """What ``read_model_state`` returns: the model built from the file, its validated ``meta`` and every
    archive entry (the record's among them, for the training application to read)."""

    model: RNN
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


def _host(a: Any) -> np.ndarray:
    return np.asarray(to_numpy(a))  # a device-to-host copy for CuPy arrays; 0-d stays 0-d


def _cell_options(cell: Any, path: Path) -> dict[str, Any]:
    """{"cell_options": {...}} for a cell with options beyond nonlinearity, else {}. CheckpointError where what is
    recorded would not rebuild the cell (``from_options(nonlinearity, **options)`` refuses them or builds another):
    a file that could never be loaded is not written."""
    more = {k: v for k, v in cell.options().items() if k != "nonlinearity"}
    registered = cell_class(cell.option) if cell.option in cell_names() else None
    if registered is not type(cell):
        raise CheckpointError(
            f"cannot write checkpoint {str(path)!r}: the cell class {type(cell).__name__} is not a registered cell "
            f"(option {cell.option!r} is {getattr(registered, '__name__', 'nobody')}'s), so a checkpoint could not "
            "rebuild it; register it under an option of its own (gpubptt.cells.register_cell); nothing was written "
            "and any existing file was kept"
        )
    try:  # as the file will hold them: through JSON (a tuple comes back a list)
        rebuilt = make_cell(cell.option, cell.nonlinearity, **json.loads(json.dumps(more)))
        same, why = rebuilt == cell, f"they build {rebuilt!r}"
    except (InputError, TypeError, ValueError) as exc:
        same, why = False, str(exc)
    if not same:
        raise CheckpointError(
            f"cannot write checkpoint {str(path)!r}: the cell {cell!r}'s options() {more} and nonlinearity "
            f"{cell.nonlinearity!r} do not rebuild it through {type(cell).__name__}.from_options ({why}); nothing "
            "was written and any existing file was kept (a cell's constructor takes its options() as keywords, or "
            "the cell overrides from_options)"
        )
    return {"cell_options": more} if more else {}


def _plain(value: Any, name: str, where: str) -> Any:
    """``value`` with every NumPy scalar (np.int64, np.float32, np.bool_) as the Python number JSON stores, in
    nested dicts and lists too; CheckpointError naming the field (``name``) for anything else JSON cannot hold."""
    if isinstance(value, np.generic) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v, f"{name}.{k}" if name else str(k), where) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{name}[{i}]", where) for i, v in enumerate(value)]
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise CheckpointError(
        f"{where}: {name} is {type(value).__name__} {value!r}, which a checkpoint cannot store (expected a number, "
        "string, bool, None, list or dict); nothing was written and any existing file was kept"
    )


def write_model_state(
    path: str | os.PathLike[str],
    model: RNN,
    record: RecordSchema,
    sections: dict[str, Any],
    entries: dict[str, np.ndarray],
    check: Callable[[dict[str, np.ndarray], str], None] | None = None,
    copies: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Write ``model`` and a training record (``sections`` of meta, archive ``entries``) to ``path`` atomically,
    and the same file to each of ``copies`` with it (``_io.write_atomic``: all replaced, or none).

    Shapes as in the model: U (H, D), W (H, H), V (K, H), b (H,), c (K,). The description, parameters
    and the record (its ``finite`` entries, its sections and then ``check(arrays, where)``) are checked
    as ``read_model_state`` checks them (non-finite values included), so a file it would refuse is never
    written (CheckpointError, and any existing file stays as it was).
    """
    copies = check_targets(path, copies)  # before any work: a folder or a str of copies is refused
    path = Path(path)
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
            # the architecture (format version 2): what the parameters above belong to
            "cell": model.cell.name,
            "nonlinearity": model.cell.nonlinearity,
            "num_layers": model.num_layers,
            "bidirectional": model.bidirectional,
            "dropout": model.dropout,
            # a cell's options beyond nonlinearity, only where it has some (rnn, gru, lstm files stay as they were)
            **_cell_options(model.cell, path),
        },
        **sections,
    }
    where = f"cannot write checkpoint {str(path)!r}"
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(_plain(meta, "", where)))}
    for k, p in model.params.items():
        arrays[f"param.{k}"] = _host(p)
    why = model.cell.constraint_violation({k: arrays[f"param.{k}"] for k in model.params})
    if why is not None:  # a file read_model_state would refuse: never written
        raise CheckpointError(
            f"cannot write checkpoint {str(path)!r}: {why}; nothing was written and any existing file was kept "
            "(model.constrain() clips it; an optimizer built on the model clips every step's new values)"
        )
    arrays.update(entries)
    for k, a in arrays.items():  # read_model_state refuses non-finite weights and state: never write them
        if k.startswith(("param.", *record.finite)) and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise CheckpointError(
                f"{where}: {k} contains NaN or infinity (a diverged run?); nothing was written and any "
                "existing file was kept"
            )
    check_meta(arrays, where, record)  # refuse what read_model_state would refuse, before anything is written
    if check is not None:
        check(arrays, where)

    for target in (path, *map(Path, copies)):
        directory = target.parent if str(target.parent) else Path(".")
        if not directory.is_dir():
            raise CheckpointError(
                f"cannot write checkpoint {str(target)!r}: directory {str(directory)!r} does not exist"
            )
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue(), copies=copies)  # the old files stay whole if anything fails
    return path


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (an .npz), or an empty one
_NPY_MAGIC = b"\x93NUMPY"


#: Members larger than this many times their compressed size (all together) are refused before they are
#: inflated: gpubptt writes its arrays uncompressed, and even zeros deflate at most about 1000:1.
MAX_RATIO = 100
_MEMBER = re.compile(r"^[A-Za-z0-9_.]{1,200}\.npy$")
_HEADER_MAX = 1 << 16  # bytes of an .npy header (gpubptt's are under 200)


def _check_members(path: Path) -> None:
    """Names, declared sizes and the compression ratio of every member, from the zip directory and the
    .npy headers alone: nothing is inflated beyond a header. CheckpointError naming the entry."""
    bad = f"{str(path)!r} is not a readable gpubptt checkpoint"
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        declared = sum(i.file_size for i in infos)
        if declared > MAX_RATIO * size + (1 << 20):
            raise CheckpointError(
                f"{bad}: its {len(infos)} entries declare {declared} bytes in a file of {size} bytes, more than "
                f"{MAX_RATIO} times its size (gpubptt stores arrays uncompressed): refused before inflating them"
            )
        seen = set()
        for info in infos:
            key = info.filename.removesuffix(".npy")
            if not info.filename.endswith(".npy"):
                raise CheckpointError(
                    f"{bad}: entry {key!r} is not a NumPy array (.npy), and a gpubptt checkpoint holds arrays only"
                )
            if not _MEMBER.match(info.filename) or info.filename in seen:
                why = "appears twice" if info.filename in seen else "is not a gpubptt entry name (letters, digits, _ .)"
                raise CheckpointError(f"{bad}: entry {info.filename[:80]!r} {why}")
            seen.add(info.filename)
            with zf.open(info) as f:
                try:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_HEADER_MAX)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_HEADER_MAX)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    offset = f.tell()
                except (ValueError, SyntaxError, TypeError, EOFError) as exc:
                    raise CheckpointError(f"{bad}: entry {key!r} has a malformed .npy header ({exc})") from None
            if dtype.hasobject:
                raise CheckpointError(
                    f"{bad}: entry {key!r} holds Python objects (pickled data), and a gpubptt checkpoint holds "
                    "plain numeric and string arrays only"
                )
            implied = offset + math.prod(shape) * dtype.itemsize
            if info.file_size != implied:
                raise CheckpointError(
                    f"{bad}: entry {key!r} declares {info.file_size} bytes, but its .npy header (shape {shape}, "
                    f"dtype {dtype}) implies {implied}"
                )


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
        _check_members(path)  # before anything is inflated
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


def read_model_state(
    path: str | os.PathLike[str], record: RecordSchema, *, backend: str | Backend | None = "auto"
) -> ModelState:
    """Read and validate a checkpoint's model (and the record's sections, by ``record``); build the model
    on ``backend``.

    Raises CheckpointError naming the problem (missing, truncated, corrupt, wrong names, shapes or
    dtypes) before anything is built. The record's entries are the caller's to check and read.
    """
    path = Path(path)
    where = f"checkpoint {str(path)!r}"
    arrays = _read(path)
    meta = check_meta(arrays, where, record)
    mm = meta["model"]  # validated: ints, a float dtype name, a bool, the one architecture built here
    D, H, K = mm["input_size"], mm["hidden_size"], mm["output_size"]
    dtype, bias = np.dtype(mm["dtype"]), mm["bias"]

    # names, from the model's one schema
    L, bidirectional = mm.get("num_layers", 1), mm.get("bidirectional", False)
    try:  # validated: a registered cell's recorded name
        options = mm.get("cell_options", {})
        if "nonlinearity" in options:  # it has a field of its own
            raise InputError("model.cell_options may not hold nonlinearity (model.nonlinearity records it)")
        the_cell = make_cell(
            cell_class(mm.get("cell", "elman"), recorded=True).option, mm.get("nonlinearity"), **options
        )
    except (InputError, TypeError, ValueError) as exc:  # an option the cell does not take, or a bad value of one
        raise CheckpointError(f"{where}: bad cell options ({exc})") from None
    expected_shapes = param_shapes(D, H, K, bias, the_cell, num_layers=L, bidirectional=bidirectional)
    param_names = tuple(expected_shapes)
    W = arrays.get("param.W")
    gates = {c: cell_class(c).gates for c in cell_names()}
    if W is not None and W.ndim == 2 and W.shape[1] == H and W.shape[0] != the_cell.gates * H:
        other = [c for c, g in gates.items() if W.shape[0] == g * H]
        if other:  # the weights of another cell: say so by the rows
            table = ", ".join(f"{c} {'' if g == 1 else g}H" for c, g in gates.items())
            raise CheckpointError(
                f"{where}: parameter W has shape {W.shape}, {W.shape[0]} rows for H = {H}: the {other[0]} cell's "
                f"({gates[other[0]]}H), but model.cell = {show(mm.get('cell', 'elman'))} has "
                f"{the_cell.gates}H = {the_cell.gates * H} ({table})"
            )
    known = {"meta"} | {f"param.{k}" for k in param_names}
    for k in arrays:
        if k not in known and not record.owns(k, the_cell):
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
    if (why := the_cell.constraint_violation(params)) is not None:  # saving refuses it: a file breaking it is not ours
        raise CheckpointError(f"{where}: {why} (an optimizer built on the model keeps every w within it)")

    be = get_backend(backend)
    arch = ModelConfig(D, H, K, the_cell, L, bidirectional, bias, dtype)  # the architecture the file records
    model = RNN.from_params(params, backend=be, dropout=mm.get("dropout", 0.0), config=arch)
    model.init = mm.get("init", "custom")
    return ModelState(model=model, meta=meta, arrays=arrays)
