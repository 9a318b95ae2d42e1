"""How much memory a training run or a ``vanish`` diagnosis will take, estimated from the shapes.

Sizes that cannot fit (``--hidden 100000``, ``--seq-len 1000000000``) are refused with the numbers
before anything is allocated, instead of failing minutes later or swapping the machine to a halt:

    >>> est = train_memory(D=65, H=100_000, K=65, T=64, B=32, itemsize=4, slots=2)  # float32, Adam
    >>> est.describe()[:66]
    'about 164.4 GB (parameters, gradients and optimizer state 160.2 GB'
    >>> check_fits(est, 16 * 2**30, "training H=100000")
    Traceback (most recent call last):
    ...
    gpubptt.engine.memory.InsufficientMemoryError: training H=100000 needs about 164.4 GB (...), but 17.2 GB is ...

Each estimate counts the arrays that are alive at the peak, to within a small factor: the
parameters (and, while a random model is drawn, its float64 host copy), their gradients and
optimizer state; the (T, B, H) states and workspaces of forward+BPTT; the output layer's chunk of
(·, B, K) probabilities; and for the diagnostics their (T, T) and (T, B, B) tables. It is meant to
tell "fits" from "cannot possibly fit", not to predict the last megabyte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..params import param_shapes
from .losses import chunk_steps

__all__ = [
    "InsufficientMemoryError",
    "MemoryEstimate",
    "cell_flow_memory",
    "check_fits",
    "check_model_size",
    "format_bytes",
    "is_out_of_memory",
    "parameter_count",
    "train_memory",
    "vanish_memory",
]

INT64 = 8  # token ids and targets
FLOAT64 = 8  # the host copy a model is drawn in, and the evaluation's sums
WORKSPACES = 4  # forward+BPTT workspaces a model keeps, one per shape (gpubptt.model.MAX_WORKSPACES)
#: The deepest stack a model may have: the same bound for ``RNN``, ``from_params``, the CLI and checkpoints.
MAX_LAYERS = 1024


class InsufficientMemoryError(InputError):
    """The estimated memory of a computation exceeds what the backend has available."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of a computation, by part: ``{"parameters ...": bytes, ...}``."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        """The sum of the parts, in bytes."""
        return sum(self.parts.values())

    def describe(self) -> str:
        """'about 80.0 GB (parameters 40.0 GB, workspaces 40.0 GB)', largest part first."""
        parts = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return f"about {format_bytes(self.total)} (" + ", ".join(f"{k} {format_bytes(v)}" for k, v in parts) + ")"


#: NumPy's refusals of an array larger than any address space (ValueError, not MemoryError)
_TOO_BIG = ("array is too big", "Maximum allowed dimension exceeded")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says something did not fit: MemoryError, any library's OutOfMemoryError (CuPy's, torch.cuda's:
    by class name), gpubptt's InsufficientMemoryError, or NumPy's refusal of an array beyond any address space."""
    if isinstance(exc, (MemoryError, InsufficientMemoryError)):
        return True
    if isinstance(exc, ValueError) and any(text in str(exc) for text in _TOO_BIG):
        return True
    return any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def format_bytes(n: float) -> str:
    """Bytes in decimal units with one decimal: '21.3 GB', '512.0 kB'; beyond exabytes '8.0e+21 B'."""
    if n >= 1e21:
        return f"{n:.1e} B"
    for unit, size in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def parameter_count(
    D: int, H: int, K: int, *, bias: bool = True, num_layers: int = 1, dirs: int = 1, gates: int = 1, cell: Any = None
) -> int:
    """Entries of every recurrence's U (G·H, D_l), W (G·H, H) and V (K, H·dirs); with ``bias``, b (G·H,) each
    (and the GRU's b_hn (H,)) and c (K,). G = ``gates``: 1 rnn, 3 gru, 4 lstm. ``cell`` (a ``Cell``):
    its own parameter shapes instead (``params.param_shapes``).

    D_0 = D and D_l = H·dirs above (torch.nn.RNN's stack).
    """
    if cell is not None:
        shapes = param_shapes(D, H, K, bias, cell, num_layers=num_layers, bidirectional=dirs == 2)
        return sum(int(np.prod(s)) for s in shapes.values())
    per_rec = gates * H * H + ((gates * H + (H if gates == 3 else 0)) if bias else 0)
    inputs = dirs * gates * (H * D + (num_layers - 1) * H * H * dirs)
    return num_layers * dirs * per_rec + inputs + K * H * dirs + (K if bias else 0)


def _gated_buffers(gates: int, T: int, B: int, H: int) -> int:
    """Elements of a gated cell's buffers where no cell object is given: gates (T, B, 4H), ∂w or c (T, B, 3H | H)
    (0 for one gate: the Elman cell keeps none beyond S)."""
    return (4 + (3 if gates == 3 else 2)) * T * B * H if gates > 1 else 0


def _forward_bptt(
    T: int, B: int, H: int, K: int, itemsize: int, chunk_elements: int, truncate: int | None,
    num_layers: int = 1, dirs: int = 1, dropout: bool = False, gates: int = 1, cell: Any = None,
) -> int:  # fmt: skip
    """Bytes of one forward+BPTT workspace for a (T, B) batch (see ``gpubptt.engine.stack.Workspace``)."""
    n = num_layers * dirs
    gates = cell.gates if cell is not None else gates
    # per recurrence S (T+1) and G (T); one shared pre; per recurrence ∂E/∂s0; the per-step row
    states = n * ((T + 1) * B * H + T * B * H + B * H) + gates * T * B * H + B * H
    if cell is not None:  # per recurrence the buffers the cell declares (and its extra state's gradient)
        states += n * (cell.buffer_elements(T, B, H) + (B * H if cell.extra_state else 0))
    elif gates > 1:  # per recurrence the gated cell's buffers and c0's gradient
        states += n * (_gated_buffers(gates, T, B, H) + 8 * B * H)
    if dirs == 2:  # the reverse direction's scratch, each layer's [forward, reverse] output, ∂E/∂output
        states += T * B * H + num_layers * T * B * 2 * H + T * B * 2 * H + T * B * INT64 // itemsize
        states += B * H  # the reverse direction's per-step row (the two directions run at once)
    if dropout and num_layers > 1:  # masks and masked inputs of every layer but the last
        states += 2 * (num_layers - 1) * T * B * H * dirs
    lanes = 2 * (truncate + 1) * B * H if truncate is not None else 0
    logits = 2 * chunk_steps(T, B, K, chunk_elements) * B * K  # probabilities and dz of one output chunk
    return (states + lanes + logits) * itemsize + 3 * T * B * INT64  # x, y and the token permutation


def train_memory(
    D: int,
    H: int,
    K: int,
    *,
    T: int,
    B: int,
    itemsize: int,
    slots: int,
    bias: bool = True,
    truncate: int | None = None,
    eval_T: int | None = None,
    eval_B: int | None = None,
    chunk_elements: int = 1 << 22,
    num_layers: int = 1,
    dirs: int = 1,
    dropout: bool = False,
    gates: int = 1,
    cell: Any = None,
) -> MemoryEstimate:
    """Peak memory of training a D → H → K model on (T, B) chunks with ``slots`` optimizer state arrays.

    ``num_layers``, ``dirs``, ``dropout``: the stack (the workspace grows with L·dirs; evaluation keeps
    each layer's states); ``cell`` the cell object: its parameter shapes and its declared buffers (what
    ``recompute.call_memory`` counts too); ``gates`` (1 rnn, 3 gru, 4 lstm) only where no cell is given.

    ``itemsize``: bytes per float (4 for float32); ``slots``: per-parameter optimizer arrays (Adam 2,
    Adagrad 1, SGD with momentum 1, plain SGD 0). ``eval_T``, ``eval_B``: the held-out chunk and batch
    (default: the training ones); evaluation keeps the full (T, B, K) probabilities of a chunk.
    """
    P = parameter_count(D, H, K, bias=bias, num_layers=num_layers, dirs=dirs, gates=gates, cell=cell)
    eval_T, eval_B = eval_T or T, eval_B or B
    n = num_layers * dirs
    evaluation = (n * (eval_T + 1) * eval_B * H + eval_T * eval_B * (H * (1 + dirs) + K)) * itemsize
    evaluation += 4 * eval_T * eval_B * FLOAT64
    # the forward's stack: the shared pre-activations and every recurrence's cell buffers (a gated cell's gates)
    G = cell.gates if cell is not None else gates
    buffers = cell.buffer_elements(eval_T, eval_B, H) if cell is not None else _gated_buffers(gates, eval_T, eval_B, H)
    evaluation += (eval_T * eval_B * G * H + n * buffers) * itemsize
    return MemoryEstimate(
        {
            # drawing the weights holds a float64 host copy beside them; afterwards gradients and slots
            "parameters, gradients and optimizer state": P * max(itemsize * (2 + slots), FLOAT64 + itemsize),
            "forward+BPTT workspaces": _forward_bptt(
                T, B, H, K, itemsize, chunk_elements, truncate, num_layers, dirs, dropout, gates, cell
            ),
            "evaluation": evaluation,
        }
    )


def cell_flow_memory(D: int, H: int, K: int, *, T: int, B: int, state: int = 1) -> MemoryEstimate:
    """Peak memory of ``gpubptt.diagnostics.gated.cell_flow`` (float64 on the host) on a D → H → K model of a cell
    whose state is ``state``·H wide (2 for an LSTM's (h, c)), on a (T, B) batch: ``vanish_memory``'s parts and
    the dense step Jacobians (T, B, n, n), n = state·H, with their running product and its transpose."""
    n = state * H
    est = vanish_memory(D, H, K, T=T, B=B, itemsize=FLOAT64)
    est.parts["step Jacobians"] = (T + 2) * B * n * n * FLOAT64
    return est


def vanish_memory(
    D: int, H: int, K: int, *, T: int, B: int, itemsize: int, random: bool = True, chunk_elements: int = 1 << 22,
    recurrences: int = 1,
) -> MemoryEstimate:  # fmt: skip
    """Peak memory of ``gpubptt.diagnostics.vanish_sweep`` on a D → H → K model and a (T, B) batch.

    ``random``: the model is drawn here (a float64 host copy while it is made) rather than loaded.
    Counts the model and a rescaled copy, the tokens, the (T, B, H) states and terms the diagnostics
    keep together, their (T, B, K) output-layer terms, (T, T) and (T, B, B) or (T, H, H) tables, and
    the forward+BPTT workspaces of the truncation sweep (the last few windows k stay cached).
    ``recurrences`` > 1 (a stack, ``diagnostics.stack_report``): every recurrence's states, factors
    and power-iteration vectors, and the adjoints of H unit vectors per layer (L·H·B·H).
    """
    P = parameter_count(D, H, K) + (recurrences - 1) * 2 * H * H * 2  # a bound on the extra layers' U and W
    terms = (
        8 * T * B * H + (T + 1) * B * H
    ) * recurrences  # states, direct term, tanh factors, lanes, scratch, power-iteration vectors
    if recurrences > 1:
        terms += 2 * recurrences * H * B * H
    tables = 2 * T * B * K + T * min(B * B, H * H) + T * T
    workspaces = WORKSPACES * _forward_bptt(T, B, H, K, itemsize, chunk_elements, T - 1)
    return MemoryEstimate(
        {
            "parameters": P * (3 * itemsize + (FLOAT64 if random else 0)),
            "tokens": 3 * T * B * INT64,
            "states and gradient terms": (terms + tables) * itemsize,
            "forward+BPTT workspaces": workspaces,
        }
    )


def check_fits(estimate: MemoryEstimate, available: int | None, what: str) -> None:
    """InsufficientMemoryError when ``estimate`` exceeds ``available`` bytes (None: unknown, no check).

    The message reads "{what} needs about 80.0 GB (parameters 40.0 GB, ...), but 21.3 GB is available".
    """
    if available is not None and estimate.total > available:
        raise InsufficientMemoryError(f"{what} needs {estimate.describe()}, but {format_bytes(available)} is available")


def check_model_size(
    cell: Any, D: int, H: int, K: int, *, num_layers: int = 1, dirs: int = 1, bias: bool = True,
    itemsize: int = 4, available: int | None = None,
) -> None:  # fmt: skip
    """Refuse a model that cannot be built, before anything is allocated: InputError when ``num_layers``
    exceeds MAX_LAYERS, InsufficientMemoryError when its parameters (and the float64 host copy they
    are drawn in) exceed ``available`` bytes (None: unknown, not checked). The count comes from the
    cell's own ``param_shapes`` for layer 0 and for the layers above: no array, no per-layer loop.
    """

    def count(D_l: int) -> int:
        return sum(math.prod(shape) for shape in cell.param_shapes(D_l, H, bias).values())

    P = dirs * (count(D) + (num_layers - 1) * count(H * dirs)) + K * H * dirs + (K if bias else 0)
    if num_layers > MAX_LAYERS:
        raise InputError(
            f"num_layers={num_layers} is above the limit of {MAX_LAYERS} layers (such a stack of H={H} would hold "
            f"{P:.3g} parameters, {format_bytes(P * itemsize)}, and run {num_layers * dirs} recurrences per step)"
        )
    estimate = MemoryEstimate({"parameters": P * itemsize, "their float64 draw on the host": P * FLOAT64})
    what = f"a model of D={D}, H={H}, K={K}, {num_layers} layer{'s' if num_layers > 1 else ''} ({P:.3g} parameters)"
    check_fits(estimate, available, what)
