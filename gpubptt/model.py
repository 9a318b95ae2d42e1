"""The RNN model: parameters, init presets, forward, loss and exact BPTT gradients.

    s_t = tanh(U x_t + W s_{t-1} [+ b])      ŷ_t = softmax(V s_t [+ c])      E = Σ_t −log ŷ_t[y_t]

Parameters have PyTorch's shapes and are never stored transposed: U (H, D) like ``weight_ih_l0``,
W (H, H) like ``weight_hh_l0``, V (K, H) like ``Linear.weight``, b (H,), c (K,).

Deep and bidirectional models (``num_layers``, ``bidirectional``) are ``torch.nn.RNN``'s stack
followed by ``Linear(H·dirs, K)``: layer l > 0 reads the concatenated [forward, reverse] outputs of
layer l − 1; each recurrence has its own U, W, b, named with torch's suffixes (``params.Recurrence``:
W_l1_reverse is ``weight_hh_l1_reverse``); V is (K, H·dirs).

    >>> import numpy as np, gpubptt
    >>> model = gpubptt.RNN(8, 16, 8, backend="numpy", seed=0)
    >>> x = np.zeros((5, 3), dtype=np.int64)                     # (T, B) token ids
    >>> loss, grads = model.loss_and_grads(x, x)
    >>> grads["W"].shape, grads["s0"].shape
    ((16, 16), (3, 16))
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._composable import Composable
from ._construction import Construction, backend_for, cell_repr, fresh_lock
from ._settings import Settings
from ._workspaces import MAX_WORKSPACES, Workspaces
from .backend import Backend
from .cells import STEP_KERNELS, Cell
from .config import ModelConfig
from .dropout import check_offset, draw_undone_on_failure
from .engine import recompute as _recompute
from .engine import stack as engine
from .engine.losses import chunk_steps, softmax_probs, xent_loss
from .engine.memory import check_model_size
from .errors import InputError, InputTypeError
from .heads import check_head, head_forward
from .params import Params
from .validation import (
    CELLS,
    INITS,
    NOTHING_COUNTED,
    REDUCTIONS,
    Batch,
    _cell,
    _check_layers,
    _check_reduction,
    _check_seed,
    _check_truncate,
    _split_state,
    batch_copies,
    check_batch,
    check_bool,
    check_c0,
    check_dtype,
    check_positive_int,
)

__all__ = ["CELLS", "INITS", "MAX_WORKSPACES", "REDUCTIONS", "RNN", "RNNOutput"]


@dataclass(eq=False)  # equal when the same object: its arrays are the caller's (== on them is elementwise)
class RNNOutput:
    """What ``RNN.forward`` returns.

    states (T, B, H·dirs) the top layer's outputs s_0..s_{T-1} ([forward, reverse], zero on padded
    steps); probs (T, B, K) softmax outputs (zero on padded steps); final_state torch's h_n
    (L·dirs, B, H), or (B, H) for a one-recurrence model given s0 (B, H) or None: each recurrence's
    state after its last valid step (forward: step lengths[b]−1; reverse: step 0; s0 when the
    length is 0). With ``batch_first`` the time and batch axes of states, probs and logits are swapped
    (views). A model's ``head`` decides probs: softmax heads' probabilities, None for the MSE heads.
    """

    states: Any
    probs: Any
    final_state: Any
    #: the output layer's z = V s + c before the softmax: (T, B, K) for the per-step heads, (B, K) for the
    #: last-step heads (``gpubptt.heads``); None for a model without an output head (``head=None``)
    logits: Any = None


class RNN(Construction, Composable, Workspaces, Settings):
    """An RNN, GRU or LSTM (one or more layers, one or two directions) with a softmax output, on NumPy or CuPy.

    ``cell`` "rnn" (the default): s_t = φ(U x_t + W s_{t-1} [+ b]), φ = ``nonlinearity``: "tanh" (the
    default) or "relu", as in ``torch.nn.RNN``. ``cell`` "gru" / "lstm": ``torch.nn.GRU`` / ``nn.LSTM``'s
    equations and gate order (``gpubptt.cells.gru``, ``gpubptt.cells.lstm``): U (3H|4H, D_l), W
    (3H|4H, H), b (3H|4H,) and, for the GRU, b_hn (H,); an LSTM's state is the tuple (h0, c0), its
    gradients hold "s0" and "c0", its final state is (h_n, c_n). ``nonlinearity`` is the rnn cell's
    only. The output layer reads the top layer's [forward, reverse] states. Shapes: x (T, B)
    token ids in [0, D) or (T, B, D) floats; y (T, B) ints in [0, K); s0 (L·dirs, B, H) as torch's h0,
    or (B, H) when L·dirs = 1; lengths (B,). Parameters per recurrence (``params.param_shapes``):
    U (H, D) on layer 0 and (H, H·dirs) above, W (H, H), b (H,); then V (K, H·dirs), c (K,).

    ``cell`` is a registered ``cell=`` option (``gpubptt.cells.cell_names()``: also "indrnn", and any cell
    registered with ``gpubptt.cells.register_cell``) or a ``Cell`` instance; ``model.config`` records the
    architecture.

    ``dropout`` p: as torch, inverted dropout on the outputs of every layer but the last, in
    ``loss_and_grads`` only (``forward`` never drops); masks come from a generator on the backend
    seeded with ``seed``, or per call from ``dropout_seed``.

    ``bias`` (default True, as ``torch.nn.RNN`` and ``gpubptt train``): the biases b (per recurrence) and
    c; ``bias=False``: none.

    init="wildml": U ~ U(±1/√D_l), W ~ U(±1/√H), V ~ U(±1/√(H·dirs)), biases zero.
    init="torch":  like ``torch.nn.RNN`` (GRU, LSTM) + ``nn.Linear``: every recurrent parameter ~ U(±1/√H), V and c
                   ~ U(±1/√(H·dirs)).
    Random numbers come from NumPy's ``default_rng(seed)`` on the host, so every backend starts
    from identical weights.

    ``precision`` (a runtime choice like the backend; see ``precision``): "fp32" (the default), "tf32" or
    "bf16" GEMM operands, float32 models only; None takes a ``Backend.with_precision`` view's own.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        num_layers: int = 1,
        bidirectional: bool = False,
        nonlinearity: str | None = None,
        dropout: float = 0.0,
        cell: str | Cell = "rnn",
        backend: str | Backend | None = "auto",
        dtype: Any = "float32",
        bias: bool = True,
        init: str = "wildml",
        seed: int | None = None,
        precision: str | None = None,
    ) -> None:
        D = check_positive_int(input_size, "input_size")
        H = check_positive_int(hidden_size, "hidden_size")
        K = check_positive_int(output_size, "output_size")
        L, bidirectional, dropout = _check_layers(num_layers, bidirectional, dropout)
        dt = check_dtype(dtype)
        if not isinstance(bias, (bool, np.bool_)):
            raise InputTypeError(f"bias must be a bool, got {type(bias).__name__}")
        seed = _check_seed(seed)
        the_cell = _cell(nonlinearity, cell)
        if init not in the_cell.inits:
            raise InputError(
                f"unknown init {init!r} for cell {the_cell.option!r}; expected one of {', '.join(the_cell.inits)}"
            )
        be = backend_for(backend, precision, dt)
        check_model_size(
            the_cell, D, H, K, num_layers=L, dirs=2 if bidirectional else 1, bias=bool(bias), itemsize=dt.itemsize,
            available=be.available_memory(),
        )  # fmt: skip
        rng = np.random.default_rng(seed)
        config = ModelConfig(D, H, K, the_cell, L, bidirectional, bool(bias), dt)
        n_out = H * config.num_directions
        bases = {r.name(k): k for r in config.recurrences for k in the_cell.param_shapes(1, 1, bool(bias))}
        host = {}
        for name, shape in config.param_shapes().items():
            if name in ("V", "c"):
                a = 1 / np.sqrt(n_out) if (name == "V" or init == "torch") else 0.0
                bounds = (-a, a) if a else None
            else:  # the cell's own parameters start where the cell says
                bounds = the_cell.init_bounds(bases[name], shape, init, H)
            host[name] = rng.uniform(*bounds, size=shape) if bounds else np.zeros(shape)
        self._setup(be, config, {k: be.asarray(v, dtype=dt) for k, v in host.items()})
        self._set_dropout(dropout, seed)
        self.init = init

    def _setup(self, be: Backend, config: ModelConfig, params: dict[str, Any]) -> None:
        self.backend = be
        self._config = config  # the architecture: ``config``, ``cell``, ``dtype``, … read it (``Settings``)
        self._recurrences = tuple(config.recurrences)
        self._params = Params(be, config.dtype, config.param_shapes(), params)
        self.init = "custom"
        self._set_dropout(0.0, None)
        self.use_graphs = True
        #: How recurrence steps run where the backend compiles kernels (CuPy). "auto": per shape, the
        #: fastest of cuBLAS + a fused elementwise kernel, one fused step kernel, or one persistent
        #: kernel for all steps (timed once per shape); "cublas", "fused" or "persistent" forces one
        #: (persistent only where W fits on chip). None: the backend's ``step_kernels`` ("auto"
        #: unless changed there). No effect on NumPy.
        self.step_kernels: str | None = None
        #: Logits per output-layer chunk (the loss's memory is O(chunk·B·K)). None: the backend's
        #: ``chunk_elements`` (2^22 on the CPU, 2^24 on a GPU).
        self.chunk_elements: int | None = None
        #: The output head and loss (``gpubptt.heads``): "softmax" (per step, the default), "last_softmax",
        #: "mse", "last_mse", or None (no output layer: use ``vjp``); a call's ``head=`` overrides it.
        self.head: str | None = "softmax"
        self.batch_first = False
        self._workspaces: dict[tuple, engine.Workspace] = {}
        self._spares: dict[tuple, Any] = {}  # forward buffers a finished pullback gave back (``_give_spare``)
        # Concurrent loss_and_grads calls on one model share these workspaces: one at a time.
        fresh_lock(self)  # re-entrant: a locked call may call another; renewed in a forked child
        self._param_names: dict[Any, list[tuple[str, str]]] = {}  # recurrence_params' names, per recurrence

    def _set_dropout(self, dropout: float, seed: int | None) -> None:
        #: Dropout probability on the outputs of every layer but the last (``loss_and_grads`` only).
        self.dropout = dropout
        self._dropout_rng = self.backend.random_generator(seed)

    def recurrence_params(self, r: Any) -> dict[str, Any]:
        """Recurrence ``r``'s parameters by the cell's base names ("U", "W", "b"): what the cell reads."""
        if r not in self._param_names:  # (base, full name) pairs, once per recurrence: the cell and bias are fixed
            self._param_names[r] = [(k, r.name(k)) for k in self.cell.param_shapes(1, 1, self.bias)]
        return {k: self.params[n] for k, n in self._param_names[r] if n in self.params}

    def constrain(self, params: Mapping[str, Any] | None = None) -> None:
        """Project every recurrence's parameters onto the cell's constraint set, in place (the cell's
        ``constrain``; a no-op for the unconstrained cells): the model's own, or ``params`` (arrays by the model's
        names, e.g. an optimizer's new values before it commits them; names it lacks are the model's).
        An optimizer built on the model calls it on every step's new values."""
        for r in self.recurrences:
            p = self.recurrence_params(r)
            if params is not None:
                p = {k: params.get(r.name(k), a) for k, a in p.items()}
            self.cell.constrain(p, xp=self.backend.xp)

    @property
    def params(self) -> Params:
        """The parameters by name: U (H, D), W (H, H), V (K, H), [b (H,), c (K,)]; assignments are checked."""
        return self._params

    @params.setter
    def params(self, arrays: Mapping[str, Any]) -> None:
        """``model.params = {...}``: every array checked first, then all replaced (the mapping stays the model's)."""
        self._params.replace_all(arrays)

    def __repr__(self) -> str:
        return (
            f"RNN(input_size={self.input_size}, hidden_size={self.hidden_size}, output_size={self.output_size}, "
            f"backend={self.backend.name!r}, dtype={self.dtype.name!r}, bias={self.bias}"
            + ("" if self.precision == "fp32" else f", precision={self.precision!r}")
            + ("" if self.num_layers == 1 else f", num_layers={self.num_layers}")
            + ("" if not self.bidirectional else ", bidirectional=True")
            + cell_repr(self)
            + ("" if not self.dropout else f", dropout={self.dropout}")
            + ")"
        )

    # -- the math -----------------------------------------------------------------------------
    def _check(self, x: Any, y: Any, s0: Any, lengths: Any, for_loss: bool) -> Batch:
        h0, c0 = _split_state(s0, self.cell)
        batch = check_batch(
            self.backend,
            self.dtype,
            self.input_size,
            self.hidden_size,
            self.output_size,
            x,
            y,
            h0,
            lengths,
            for_loss=for_loss,
            needs_targets=for_loss,
            num_states=self.num_states,
        )
        if c0 is not None:
            check_c0(self.backend, self.dtype, c0, batch)
        return batch

    def _step_kernels(self) -> str:
        value = self.backend.step_kernels if self.step_kernels is None else self.step_kernels
        if value not in STEP_KERNELS:
            raise InputError(f"step_kernels must be one of {', '.join(STEP_KERNELS)} or None, got {value!r}")
        if self.precision != "fp32" and self.backend.compiles_kernels:  # fused/persistent kernels multiply in float32
            if value in ("fused", "persistent"):
                raise InputError(
                    f"step_kernels={value!r} computes W's products in its own float32 kernel; precision="
                    f"{self.precision!r} runs them as cuBLAS GEMMs: use step_kernels 'cublas' or 'auto'"
                )
            return "cublas"
        return value

    def _chunk_elements(self) -> int:
        value = self.backend.chunk_elements if self.chunk_elements is None else self.chunk_elements
        return check_positive_int(value, "chunk_elements")

    def _stack(
        self, batch: Batch, dropout_seed: int | None = None, dropout_offset: int = 0, *, spare: tuple | None = None
    ) -> engine.Stack:
        """Forward buffers, run on the batch (with dropout only when a dropout_seed is given): fresh ones, or
        under ``spare`` (a key of ``_spare_key``) the set a finished pullback gave back, when there is one."""
        drop = dropout_seed is not None and self.dropout > 0 and self.num_layers > 1
        stack = self._take_spare(spare) if spare is not None and not drop else None
        if stack is None:
            stack = engine.Stack(self, batch.T, batch.B, dropout=drop)
        stack.load(batch.s0_stacked, batch.lengths, batch.c0_stacked)
        if drop:
            stack.draw_masks(dropout_seed, self.dropout, dropout_offset)
        stack.run(batch.x, batch.tokens, step_kernels=self._step_kernels())
        return stack

    def states(self, x: Any, s0: Any = None) -> Any:
        """Every state of the forward recurrence: S (T+1, B, H) with S[0] = s0 (zeros if None), S[t+1] = s_t.

        x (T, B) token ids or (T, B, D) floats; s0 as in ``forward``. A model with several
        recurrences gives (L·dirs, T+1, B, H): one S per recurrence in torch's order, each in its own
        time (a reverse recurrence's S[t+1] is its state after reading input step T−1−t). Fresh arrays.
        For an LSTM these are the h states (s0 the tuple (h0, c0)). With ``batch_first``, x is (B, T, …)
        and S (B, T+1, H) (each recurrence's, (L·dirs, B, T+1, H)).
        """
        S = self._states(self._check(self._swap(x, "x"), None, s0, None, for_loss=False))
        return S if not self.batch_first else S.swapaxes(-3, -2)

    def _states(self, batch: Batch) -> Any:
        """``states`` of a checked, time-major batch: S (T+1, B, H), or (L·dirs, T+1, B, H)."""
        with self._lock:  # one call of this model at a time (see loss_and_grads)
            S = engine.states(self, batch)
            return S[0] if self.num_states == 1 else self.backend.xp.stack(S)

    def _final_state(self, stack: engine.Stack, batch: Batch) -> Any:
        final = stack.final_states(batch.lengths)  # (L·dirs, B, H)
        cells = stack.final_cell_states(batch.lengths)  # an LSTM's c_n, else None
        if cells is None:
            return final[0] if batch.flat_state else final
        return (final[0], cells[0]) if batch.flat_state else (final, cells)

    def _head(self, head: Any) -> str | None:
        return check_head(self.head if head is None else head)

    def forward(self, x: Any, s0: Any = None, *, lengths: Any = None, head: str | None = None) -> RNNOutput:
        """States, logits, probabilities and final state for inputs x (no dropout, ever).

        x (T, B) token ids or (T, B, D) floats; s0 (L·dirs, B, H) or (B, H) (one recurrence) or None
        (zeros), an LSTM's the tuple (h0, c0); lengths (B,) or None. Returns RNNOutput with states (T,
        B, H·dirs) (the top layer's outputs), probs (T, B, K), final_state (L·dirs, B, H), or (B, H) as
        s0 was (an LSTM's: the tuple (h_n, c_n)), logits (T, B, K). ``head`` (None: the model's) picks
        the output: the last-step heads give logits and probs (B, K), the MSE heads probs None, no head
        (``model.head = None``) neither. ``batch_first``: x (B, T, …) and outputs (B, T, …).
        """
        head = self._head(head)
        batch = self._check(self._swap(x, "x"), None, s0, lengths, for_loss=False)
        V, c = self.params["V"], self.params.get("c")
        probs = logits = None
        with self._lock:  # one call of this model at a time (see loss_and_grads)
            stack = self._stack(batch)
            states = stack.Y[-1]
            if head == "softmax":
                chunk = chunk_steps(batch.T, batch.B, self.output_size, self._chunk_elements())
                probs = softmax_probs(states, V, c, be=self.backend, chunk=chunk)
            final = self._final_state(stack, batch)
            if batch.weight is not None:
                states = states * batch.weight[:, :, None]
            elif self.num_states == 1:
                states = states.copy()  # a view of the state buffer otherwise
        if head is not None and batch.T and batch.B:
            logits = head_forward(head, states, V, c, batch.lengths, self.num_directions, be=self.backend)
        if head == "last_softmax" and logits is not None:  # None for an empty batch (T or B = 0)
            probs = self.backend.xp.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
        if batch.weight is not None and logits is not None and head in ("softmax", "mse"):
            logits *= batch.weight[:, :, None]
            if probs is not None:
                probs *= batch.weight[:, :, None]
        per_step = head in ("softmax", "mse")
        return RNNOutput(
            states=self._out(states),
            probs=self._out(probs) if per_step else probs,
            final_state=final,
            logits=self._out(logits) if per_step else logits,
        )

    def _scale(self, batch: Batch, reduction: str) -> float:
        if reduction == "sum":
            return 1.0
        if batch.count == 0:
            raise InputError(NOTHING_COUNTED)
        return 1.0 / batch.count

    def loss(
        self,
        x: Any,
        y: Any,
        s0: Any = None,
        *,
        lengths: Any = None,
        reduction: str = "sum",
        dropout_seed: int | None = None,
        dropout_offset: int = 0,
        head: str | None = None,
    ) -> Any:
        """Cross-entropy E over the counted steps: a 0-d array on the model's backend.

        x (T, B) or (T, B, D); y (T, B); s0 as in ``forward``; lengths (B,). ``float(loss)`` reads it.
        No dropout, unless ``dropout_seed`` is given: then the masks ``loss_and_grads(...,
        dropout_seed=...)`` draws with that seed (what a finite-difference check needs), for examples
        ``dropout_offset``, ``dropout_offset`` + 1, … of a global batch. ``head`` (None: the model's) picks the
        loss and y's shape (``gpubptt.heads``).
        """
        reduction = _check_reduction(reduction)
        dropout_seed = _check_seed(dropout_seed, "dropout_seed")
        dropout_offset = check_offset(dropout_offset)
        head = self._head(head)
        if head != "softmax":  # no dropout in loss(); masks (dropout_seed) under the softmax head only
            if dropout_seed is not None:
                raise InputError(f"dropout_seed={dropout_seed!r} runs under the 'softmax' head only, not head {head!r}")
            return self._head_loss(head, x, y, s0, lengths, reduction, grads=False, drop=False)[0]
        batch = self._check(self._swap(x, "x"), self._swap_targets(y, x), s0, lengths, for_loss=True)
        scale = self._scale(batch, reduction)
        with self._lock:  # one call of this model at a time (see loss_and_grads)
            stack = self._stack(batch, dropout_seed, dropout_offset)
            chunk = chunk_steps(batch.T, batch.B, self.output_size, self._chunk_elements())
            p, be = self.params, self.backend
            loss = xent_loss(stack.Y[-1], p["V"], p.get("c"), batch.y, batch.weight, be=be, chunk=chunk)
            return loss * scale if scale != 1.0 else loss

    def loss_and_grads(
        self,
        x: Any,
        y: Any,
        s0: Any = None,
        *,
        lengths: Any = None,
        truncate: int | None = None,
        reduction: str = "sum",
        return_final_state: bool = False,
        dropout_seed: int | None = None,
        dropout_offset: int = 0,
        recompute: int | str | None = None,
        max_memory: int | None = None,
        head: str | None = None,
    ) -> tuple[Any, dict[str, Any]] | tuple[Any, dict[str, Any], Any]:
        """Loss and its exact gradients by backpropagation through time.

        x (T, B) token ids or (T, B, D) floats; y (T, B) targets; s0 (L·dirs, B, H) or (B, H) (one
        recurrence) or None, an LSTM's the tuple (h0, c0); lengths (B,). Returns (loss, grads): loss a
        0-d array on the backend (no host sync forced), grads a dict with the keys of ``params`` plus
        "s0" shaped as s0 was given ((B, H) for None with one recurrence, else (L·dirs, B, H)), and
        for an LSTM "c0" (∂E/∂c0) alike, each shaped like its parameter. The arrays returned are the
        caller's: later calls do not overwrite them.
        ``return_final_state=True`` adds a third item, the final state as in ``forward`` (what a
        stateful training loop carries into the next chunk), at no extra cost.

        With lengths, padded steps add nothing anywhere, and a reverse recurrence starts at each
        sequence's own last valid step (as torch's packed sequences). With ``dropout`` > 0 (and
        several layers) the masks are drawn for this call from the model's generator, or from a
        fresh one seeded with ``dropout_seed`` (the same seed, the same masks: ``gradcheck`` and
        ``loss(..., dropout_seed=...)`` use that); gradients are exact for the masks drawn. Each mask
        entry is a hash of (seed, layer, step, example, unit), the example counted from
        ``dropout_offset`` (data parallelism: a rank's first stream), so the examples of a global
        batch get the same masks however the batch is split over calls.

        truncate=None is full BPTT. truncate=k is the tutorial truncation, per recurrence: the
        gradient arriving at a recurrence's output at its step t flows back through its steps t,
        t−1, …, t−k only (a reverse recurrence's steps in its own time), and its s0 receives it
        only when that window reaches its step 0. Between layers gradients pass at the same step,
        in full. This is not the chunked truncation used to train on long streams, which cuts the
        sequence into chunks, carries the state forward across chunks and backpropagates within
        each chunk (call this method per chunk with s0 = the previous chunk's final state for that).

        On CuPy (``use_graphs``), the first call for a shape records forward+BPTT as a CUDA graph;
        later calls copy the inputs into place and replay it as one launch.

        ``recompute`` (long sequences, ``gpubptt.engine.recompute``): None keeps every state; an int c keeps
        the states at the start of every c-step segment and recomputes each segment's states and
        output layer in the backward pass (one more forward, O((T/c + c)·B·H) memory); "sqrt" takes
        c = ⌈√T⌉; "auto" the fastest policy whose estimate fits ``max_memory`` bytes. The gradient is
        the stored path's. With ``max_memory``, a call whose estimate (``memory_estimate``) exceeds it
        is refused before any work (``InsufficientMemoryError``, naming the smallest budget that works).

        ``head`` (None: the model's ``head``) picks the output layer and loss (``gpubptt.heads``): the
        default "softmax" runs fused in the workspace as above; "last_softmax" (y (B,) labels), "mse"
        (y (T, B, K) floats) and "last_mse" (y (B, K)) run the stack's pullback (``vjp``) under the
        head's gradient, with full BPTT, every state stored and no dropout (truncate, recompute,
        max_memory and dropout_seed are refused for them).
        """
        reduction = _check_reduction(reduction)
        return_final_state = check_bool(return_final_state, "return_final_state")
        truncate = _check_truncate(truncate)
        dropout_seed = _check_seed(dropout_seed, "dropout_seed")
        dropout_offset = check_offset(dropout_offset)
        recompute = _recompute.check_recompute(recompute)
        max_memory = _recompute.check_max_memory(max_memory)
        head = self._head(head)
        if head != "softmax":
            refused = (("truncate", truncate), ("recompute", recompute), ("dropout_seed", dropout_seed),
                       ("max_memory", max_memory))  # fmt: skip
            for name, value in refused:
                if value is not None:
                    raise InputError(f"{name}={value!r} runs under the 'softmax' head only, not head {head!r}")
            loss, grads, final = self._head_loss(head, x, y, s0, lengths, reduction, grads=True)
            return (loss, grads, final) if return_final_state else (loss, grads)
        batch = self._check(self._swap(x, "x"), self._swap_targets(y, x), s0, lengths, for_loss=True)
        scale = self._scale(batch, reduction)
        c = _recompute.choose(
            self, batch.T, batch.B, tokens=batch.tokens, lengths=batch.weight is not None,
            recompute=recompute, max_memory=max_memory, truncate=truncate, held=batch_copies(batch, x, y),
        )  # fmt: skip
        drawn = self._dropout_rng if dropout_seed is None and self.dropout > 0 else None  # a failed call draws none
        with self._lock, draw_undone_on_failure(drawn):  # the workspace (and graph) is this model's: others wait
            if c is None:
                ws = self._workspace(batch, truncate)
                ws.load(batch, self._dropout_rng if dropout_seed is None else dropout_seed, dropout_offset)
            else:
                ws = self._segment_workspace(batch, c)
                ws.load(batch)
            ws.run()
            # every gradient is linear in do_t, so the mean is the sum scaled once, at the end
            loss = ws.loss * scale if scale != 1.0 else ws.loss.copy()
            grads = {k: (g * scale if scale != 1.0 else g.copy()) for k, g in ws.grads.items()}
            extra = getattr(self.cell, "extra_state", False)
            for k in ("s0", extra) if extra else ("s0",):
                if batch.flat_state:
                    grads[k] = grads[k][0]
                elif batch.s0 is not None:
                    grads[k] = grads[k].reshape(batch.s0.shape)
            final = None
            if return_final_state:
                final = self._final_state(ws.stack, batch) if c is None else ws.final.copy()
                final = final[0] if c is not None and batch.flat_state else final
                if c is not None and ws.extra:  # an LSTM's (h_n, c_n)
                    final = (final, ws.final_c[0].copy() if batch.flat_state else ws.final_c.copy())
            if c is not None:
                ws.batch = None  # the segment workspace reads the caller's arrays in place: do not keep them
        if return_final_state:
            return loss, grads, final
        return loss, grads
