"""The RNN model: parameters, init presets, forward, loss and exact BPTT gradients.

    s_t = tanh(U x_t + W s_{t-1} [+ b])      ŷ_t = softmax(V s_t [+ c])      E = Σ_t −log ŷ_t[y_t]

Parameters have PyTorch's shapes and are never stored transposed: U (H, D) like ``weight_ih_l0``,
W (H, H) like ``weight_hh_l0``, V (K, H) like ``Linear.weight``, b (H,), c (K,).

    >>> import numpy as np, gpubptt
    >>> model = gpubptt.RNN(8, 16, 8, backend="numpy", seed=0)
    >>> x = np.zeros((5, 3), dtype=np.int64)                     # (T, B) token ids
    >>> loss, grads = model.loss_and_grads(x, x)
    >>> grads["W"].shape, grads["s0"].shape
    ((16, 16), (3, 16))
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import engine, interop
from ._checks import Batch, check_batch, check_dtype, check_positive_int
from .backend import Backend, get_backend
from .cells import NONLINEARITIES, STEP_KERNELS, ElmanCell
from .errors import InputError, InputTypeError, ShapeError
from .losses import chunk_steps, softmax_probs, xent_loss
from .params import PARAM_NAMES, Params, param_shapes

__all__ = ["INITS", "REDUCTIONS", "RNN", "RNNOutput"]

INITS = ("wildml", "torch")
REDUCTIONS = ("sum", "mean")


@dataclass
class RNNOutput:
    """What ``RNN.forward`` returns.

    states (T, B, H) s_0..s_{T-1} (zero on padded steps); probs (T, B, K) softmax outputs (zero on
    padded steps); final_state (B, H) the state at step lengths[b]−1 (s0 when the length is 0).
    """

    states: Any
    probs: Any
    final_state: Any


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


def _cell(nonlinearity: Any) -> ElmanCell:
    if nonlinearity not in NONLINEARITIES:
        raise InputError(f"unknown nonlinearity {nonlinearity!r}; expected one of {', '.join(NONLINEARITIES)}")
    return ElmanCell(nonlinearity)


class RNN:
    """A vanilla RNN with a softmax output, batched and time-major, on NumPy or CuPy.

    s_t = φ(U x_t + W s_{t-1} [+ b]), φ = ``nonlinearity``: "tanh" (the default) or "relu", as in
    ``torch.nn.RNN``. Shapes: x (T, B) token ids in [0, D) or (T, B, D) floats; y (T, B) ints in [0, K);
    s0 (B, H); lengths (B,). Parameters U (H, D), W (H, H), V (K, H), b (H,), c (K,).

    init="wildml": U ~ U(±1/√D), V and W ~ U(±1/√H), biases zero.
    init="torch":  every parameter ~ U(±1/√H), like ``torch.nn.RNN``.
    Random numbers come from NumPy's ``default_rng(seed)`` on the host, so every backend starts
    from identical weights.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        output_size: int,
        *,
        backend: str | Backend | None = "auto",
        dtype: Any = "float32",
        bias: bool = False,
        init: str = "wildml",
        seed: int | None = None,
        nonlinearity: str = "tanh",
    ) -> None:
        D = check_positive_int(input_size, "input_size")
        H = check_positive_int(hidden_size, "hidden_size")
        K = check_positive_int(output_size, "output_size")
        dt = check_dtype(dtype)
        if init not in INITS:
            raise InputError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")
        if not isinstance(bias, (bool, np.bool_)):
            raise InputTypeError(f"bias must be a bool, got {type(bias).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise InputError(f"seed must be None or an int ≥ 0, got {type(seed).__name__} {seed!r}")
        cell = _cell(nonlinearity)
        be = get_backend(backend)
        rng = np.random.default_rng(seed)
        if init == "wildml":
            bounds = {"U": 1 / np.sqrt(D), "W": 1 / np.sqrt(H), "V": 1 / np.sqrt(H)}
        else:
            bounds = {
                "U": 1 / np.sqrt(H),
                "W": 1 / np.sqrt(H),
                "V": 1 / np.sqrt(H),
                "b": 1 / np.sqrt(H),
                "c": 1 / np.sqrt(H),
            }
        shapes = param_shapes(D, H, K, bool(bias))
        host = {}
        for name, shape in shapes.items():
            a = bounds.get(name, 0.0)
            host[name] = rng.uniform(-a, a, size=shape) if a else np.zeros(shape)
        self._setup(be, dt, shapes, {k: be.asarray(v, dtype=dt) for k, v in host.items()}, cell)
        self.init = init

    def _setup(
        self, be: Backend, dtype: np.dtype, shapes: dict[str, tuple[int, ...]], params: dict[str, Any], cell: ElmanCell
    ) -> None:
        self.backend = be
        self.dtype = dtype
        self.cell = cell
        self._params = Params(be, dtype, shapes, params)
        self.init = "custom"
        #: On CuPy, record forward+BPTT once per shape as a CUDA graph and replay it (no effect on NumPy).
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
        self._workspaces: dict[tuple, engine.Workspace] = {}
        # Concurrent loss_and_grads calls on one model share these workspaces: one at a time.
        self._lock = threading.Lock()

    @property
    def params(self) -> Params:
        """The parameters by name: U (H, D), W (H, H), V (K, H), [b (H,), c (K,)]; assignments are checked."""
        return self._params

    @params.setter
    def params(self, arrays: Mapping[str, Any]) -> None:
        """``model.params = {...}``: every array checked first, then all replaced (the mapping stays the model's)."""
        self._params.replace_all(arrays)

    # -- construction from arrays -------------------------------------------------------------
    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        *,
        backend: str | Backend | None = "auto",
        dtype: Any = None,
        nonlinearity: str = "tanh",
    ) -> RNN:
        """Build a model from arrays (NumPy or backend) keyed "U", "W", "V" and optionally "b", "c".

        Shapes U (H, D), W (H, H), V (K, H), b (H,), c (K,); b and c come together or not at all.
        ``dtype=None`` keeps the arrays' float dtype (float32 or float64). The arrays are copied.
        ``nonlinearity`` "tanh" or "relu".
        """
        cell = _cell(nonlinearity)
        if not isinstance(params, Mapping):
            raise InputTypeError(f"params must be a mapping of arrays, got {type(params).__name__}")
        unknown = sorted(set(params) - set(PARAM_NAMES))
        if unknown:
            raise InputError(f"unknown parameter names {unknown}; expected U, W, V and optionally b, c")
        missing = [k for k in ("U", "W", "V") if k not in params]
        if missing:
            raise InputError(f"params is missing {missing}; expected U (H, D), W (H, H), V (K, H)")
        if ("b" in params) != ("c" in params):
            raise InputError("params must hold both biases 'b' (H,) and 'c' (K,) or neither")
        be = get_backend(backend)
        host = {k: be.to_numpy(params[k]) for k in params}
        for k, a in host.items():
            if a.dtype.kind != "f":
                raise InputTypeError(f"parameter {k} must be floating point, got dtype {a.dtype}")
        dt = check_dtype(dtype if dtype is not None else host["U"].dtype)
        if host["U"].ndim != 2 or host["W"].ndim != 2 or host["V"].ndim != 2:
            raise ShapeError("U, W, V must be 2-d: got " + ", ".join(f"{k} {host[k].shape}" for k in ("U", "W", "V")))
        H, D = host["U"].shape
        K = host["V"].shape[0]
        expected = param_shapes(D, H, K, "b" in host)
        for k, a in host.items():
            if a.shape != expected[k]:
                raise ShapeError(
                    f"parameter {k} must have shape {expected[k]} (from U {host['U'].shape}), got {a.shape}"
                )
        if min(H, D, K) < 1:
            raise ShapeError(f"every size must be ≥ 1; got D={D}, H={H}, K={K}")
        model = cls.__new__(cls)
        model._setup(be, dt, expected, {k: be.asarray(np.array(a)) for k, a in host.items()}, cell)  # Params checks
        return model

    @classmethod
    def from_torch(
        cls,
        rnn_state_dict: Mapping[str, Any],
        linear_state_dict: Mapping[str, Any],
        *,
        cell: str = "rnn",
        nonlinearity: str = "tanh",
        backend: str | Backend | None = "auto",
        dtype: Any = None,
    ) -> RNN:
        """A model from the state dicts of ``nn.RNN(D, H, bias=...)`` and ``nn.Linear(H, K, bias=...)``.

        Sizes and biases are read from the keys and shapes (``gpubptt.interop`` has the table;
        torch's two RNN biases become their sum b). Values: torch tensors or arrays; torch is not
        imported. ``nonlinearity`` as the nn.RNN's (a state dict does not record it); ``cell`` "rnn".
        """
        if cell != "rnn":
            raise InputError(f"cell {cell!r} is not built by this gpubptt; expected 'rnn' (nn.RNN)")
        params = interop.from_torch_state(rnn_state_dict, linear_state_dict)
        return cls.from_params(params, backend=backend, dtype=dtype, nonlinearity=nonlinearity)

    def to_torch(self, grads: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(rnn_state_dict, linear_state_dict) of NumPy arrays under torch's names: the weights, or ``grads``.

        For ``nn.RNN(D, H, bias=self.bias, nonlinearity=self.nonlinearity)`` and ``nn.Linear(H, K,
        bias=self.bias)``: ``load_state_dict({k: torch.as_tensor(v) ...})``. b goes to bias_ih_l0
        and zeros to bias_hh_l0; with ``grads`` (as ``loss_and_grads`` returns them) both get db.
        """
        if grads is None:
            return interop.to_torch_state(self.params)
        return interop.to_torch_state(grads, grads=True)

    def to(self, backend: str | Backend) -> RNN:
        """A copy of this model on another backend (same dtype, weights and settings)."""
        copy = RNN.from_params(self.params, backend=backend, dtype=self.dtype, nonlinearity=self.nonlinearity)
        copy.init, copy.use_graphs = self.init, self.use_graphs
        copy.step_kernels, copy.chunk_elements = self.step_kernels, self.chunk_elements
        return copy

    # -- sizes --------------------------------------------------------------------------------
    @property
    def nonlinearity(self) -> str:
        """φ of the recurrence: "tanh" or "relu"."""
        return self.cell.nonlinearity

    @property
    def input_size(self) -> int:
        """D."""
        return int(self.params["U"].shape[1])

    @property
    def hidden_size(self) -> int:
        """H."""
        return int(self.params["W"].shape[0])

    @property
    def output_size(self) -> int:
        """K."""
        return int(self.params["V"].shape[0])

    @property
    def bias(self) -> bool:
        """Whether the model has biases b and c."""
        return "b" in self.params

    def __repr__(self) -> str:
        return (
            f"RNN(input_size={self.input_size}, hidden_size={self.hidden_size}, output_size={self.output_size}, "
            f"backend={self.backend.name!r}, dtype={self.dtype.name!r}, bias={self.bias}"
            + ("" if self.nonlinearity == "tanh" else f", nonlinearity={self.nonlinearity!r}")
            + ")"
        )

    # -- the math -----------------------------------------------------------------------------
    def _check(self, x: Any, y: Any, s0: Any, lengths: Any, for_loss: bool) -> Batch:
        return check_batch(
            self.backend,
            self.dtype,
            self.input_size,
            self.hidden_size,
            self.output_size,
            x,
            y,
            s0,
            lengths,
            for_loss=for_loss,
            needs_targets=for_loss,
        )

    def _step_kernels(self) -> str:
        value = self.backend.step_kernels if self.step_kernels is None else self.step_kernels
        if value not in STEP_KERNELS:
            raise InputError(f"step_kernels must be one of {', '.join(STEP_KERNELS)} or None, got {value!r}")
        return value

    def _chunk_elements(self) -> int:
        value = self.backend.chunk_elements if self.chunk_elements is None else self.chunk_elements
        return check_positive_int(value, "chunk_elements")

    def _states(self, batch: Batch) -> Any:
        return engine.states(self, batch, step_kernels=self._step_kernels())

    def states(self, x: Any, s0: Any = None) -> Any:
        """Every state of the forward recurrence: S (T+1, B, H) with S[0] = s0 (zeros if None), S[t+1] = s_t.

        x (T, B) token ids or (T, B, D) floats; s0 (B, H) or None. Fresh arrays on the backend.
        """
        return self._states(self._check(x, None, s0, None, for_loss=False))

    def _final_state(self, S: Any, batch: Batch) -> Any:
        xp = self.backend.xp
        if batch.lengths is None:
            return S[batch.T].copy()
        return S[self.backend.asarray(batch.lengths), xp.arange(batch.B)]  # S[len] = s_{len−1}

    def forward(self, x: Any, s0: Any = None, *, lengths: Any = None) -> RNNOutput:
        """States, probabilities and final state for inputs x.

        x (T, B) token ids or (T, B, D) floats; s0 (B, H) or None (zeros); lengths (B,) or None.
        Returns RNNOutput with states (T, B, H), probs (T, B, K), final_state (B, H).
        """
        batch = self._check(x, None, s0, lengths, for_loss=False)
        S = self._states(batch)
        states = S[1:]
        chunk = chunk_steps(batch.T, batch.B, self.output_size, self._chunk_elements())
        probs = softmax_probs(states, self.params["V"], self.params.get("c"), be=self.backend, chunk=chunk)
        final = self._final_state(S, batch)
        if batch.weight is not None:
            states = states * batch.weight[:, :, None]
            probs *= batch.weight[:, :, None]
        return RNNOutput(states=states, probs=probs, final_state=final)

    def _scale(self, batch: Batch, reduction: str) -> float:
        if reduction == "sum":
            return 1.0
        if batch.count == 0:
            raise InputError("reduction='mean' needs at least one counted step; every length is 0")
        return 1.0 / batch.count

    def loss(self, x: Any, y: Any, s0: Any = None, *, lengths: Any = None, reduction: str = "sum") -> Any:
        """Cross-entropy E over the counted steps: a 0-d array on the model's backend.

        x (T, B) or (T, B, D); y (T, B); s0 (B, H); lengths (B,). ``float(loss)`` reads it.
        """
        reduction = _check_reduction(reduction)
        batch = self._check(x, y, s0, lengths, for_loss=True)
        scale = self._scale(batch, reduction)
        S = self._states(batch)
        chunk = chunk_steps(batch.T, batch.B, self.output_size, self._chunk_elements())
        p, be = self.params, self.backend
        loss = xent_loss(S[1:], p["V"], p.get("c"), batch.y, batch.weight, be=be, chunk=chunk)
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
    ) -> tuple[Any, dict[str, Any]] | tuple[Any, dict[str, Any], Any]:
        """Loss and its exact gradients by backpropagation through time.

        x (T, B) token ids or (T, B, D) floats; y (T, B) targets; s0 (B, H) or None; lengths (B,).
        Returns (loss, grads): loss a 0-d array on the backend (no host sync forced), grads a dict
        with the keys of ``params`` plus "s0" (B, H), each shaped like its parameter. The arrays
        returned are the caller's: later calls do not overwrite them. ``return_final_state=True``
        adds a third item, the final state (B, H) as in ``forward`` (what a stateful training loop
        carries into the next chunk), at no extra cost.

        truncate=None is full BPTT. truncate=k is the tutorial truncation: the gradient of each E_t
        flows back through steps t, t−1, …, t−k only, and grads["s0"] receives E_t's gradient only
        when that window reaches step 0 (t ≤ k). This is not the chunked truncation used to train
        on long streams, which cuts the sequence into chunks, carries the state forward across
        chunks and backpropagates within each chunk (call this method per chunk with s0 = the
        previous chunk's final state for that).

        On CuPy (``use_graphs``), the first call for a shape records forward+BPTT as a CUDA graph;
        later calls copy the inputs into place and replay it as one launch.
        """
        reduction = _check_reduction(reduction)
        truncate = _check_truncate(truncate)
        batch = self._check(x, y, s0, lengths, for_loss=True)
        scale = self._scale(batch, reduction)
        with self._lock:  # the workspace (and its graph) is this model's: another thread waits its turn
            ws = self._workspace(batch, truncate)
            ws.load(batch)
            ws.run()
            # every gradient is linear in do_t, so the mean is the sum scaled once, at the end
            loss = ws.loss * scale if scale != 1.0 else ws.loss.copy()
            grads = {k: (g * scale if scale != 1.0 else g.copy()) for k, g in ws.grads.items()}
            final = self._final_state(ws.S, batch) if return_final_state else None
        if return_final_state:
            return loss, grads, final
        return loss, grads

    def workspaces(self) -> list[dict[str, Any]]:
        """The cached forward+BPTT workspaces, least recently used first (at most MAX_WORKSPACES).

        Each a dict: T, B, tokens, lengths, truncate (None: full BPTT), use_graphs, step_kernels,
        chunk (time steps per output-layer chunk) and captured (replayed as one CUDA graph).
        """
        with self._lock:
            return [ws.describe() for ws in self._workspaces.values()]

    def _workspace(self, batch: Batch, truncate: int | None) -> engine.Workspace:
        """The cached buffers (and, on CuPy, the captured graph) for this shape of work."""
        if truncate is not None and truncate >= batch.T - 1:
            truncate = None  # the window covers every step: full BPTT
        be = self.backend
        step_kernels, chunk_elements = self._step_kernels(), self._chunk_elements()
        key = (
            batch.T, batch.B, batch.tokens, batch.weight is not None, truncate, self.use_graphs, step_kernels,
            chunk_elements, tuple(be.data_ptr(p) for p in self.params.values()),
        )  # fmt: skip
        ws = self._workspaces.pop(key, None)
        if ws is None:
            ws = engine.Workspace(self, batch, truncate, step_kernels=step_kernels, chunk_elements=chunk_elements)
            while len(self._workspaces) >= MAX_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))
        self._workspaces[key] = ws  # most recently used last
        return ws


MAX_WORKSPACES = 4
