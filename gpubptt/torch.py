"""gpubptt as a ``torch.nn`` module: torch's RNN / GRU / LSTM interface, gpubptt's forward and exact BPTT.

    >>> import torch, gpubptt.torch
    >>> lstm = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True)
    >>> rec = gpubptt.torch.Recurrent.from_module(lstm)
    >>> out, (h_n, c_n) = rec(torch.randn(20, 4, 8))            # (T, B, 2H), (L·dirs, B, H) twice
    >>> out.sum().backward()                                     # gpubptt's pullback under torch autograd

``Recurrent`` holds torch Parameters under torch's names (``weight_ih_l0``, ``bias_hh_l1_reverse``,
…), so its ``state_dict()`` loads into the torch module and back; ``from_module`` shares the module's
Parameter objects. ``forward(x, hx=None, *, lengths=None)`` returns what the torch module returns:
``(output, h_n)``, an LSTM's ``(output, (h_n, c_n))``; x may be a ``PackedSequence`` (the output
is then one too) or padded with ``lengths`` (B,) (torch's packed semantics: padded outputs are zero,
h_n is each sequence's state after its own last step, the reverse direction starts there).

Autograd: one ``torch.autograd.Function`` whose forward is ``model.vjp`` and whose backward is the
pullback (``gpubptt.engine.pullback``), so gradients reach x, hx and every Parameter. Tensors cross without
a copy: NumPy views of CPU tensors (``Tensor.numpy`` / ``torch.from_numpy``), CuPy arrays of CUDA
tensors by DLPack, run on the tensors' device and torch's current stream there. The gpubptt model
holds views of the Parameters' memory, made and checked once and made again only when a Parameter
is replaced; in-place updates (optimizers, ``load_state_dict``) reach it as they are. torch's two
biases per recurrence enter gpubptt as their sum (the GRU keeps b_hn apart), refreshed each call;
each receives the summed bias's gradient (its own tensor). A Parameter, x or hx changed in place between
a forward and its backward raises torch's in-place error; a forward's pullback runs once:
``backward(retain_graph=True)`` followed by a second backward through the same output raises
``PullbackError``, as does a double backward (the gradients that ``create_graph=True`` gives are not
themselves differentiable). Weights computed by a parametrization or pruning, and Parameters tied under two names,
enter as the module computes them each call; under ``torch.compile`` the forward is a graph break.

This module imports torch; ``import gpubptt`` does not (``pip install torch``, or the ``torch`` extra of the source
folder: ``pip install -e '.[torch]'``).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import interop
from ._torch_function import _array, _carries_c, _Pullback, identity
from .backend import get_backend
from .backend.precision import check_precision
from .cells import cell_class, cell_names
from .engine.recompute import check_recompute, unsupported_reason
from .errors import BackendMismatchError, InputError, InputTypeError, ShapeError
from .model import RNN
from .params import recurrences
from .validation import check_bool

__all__ = ["Recurrent"]

#: torch's module class → the ``cell=`` option of the registered cell that declares it (``Cell.torch_module``)
_CELLS = {
    getattr(torch.nn, cls.torch_module.removeprefix("nn.")): name
    for name in cell_names()
    if (cls := cell_class(name)).torch_module and hasattr(torch.nn, cls.torch_module.removeprefix("nn."))
}


@cache
def _split_b_hn(cell: str) -> bool:
    """Whether the cell keeps the n third of torch's bias_hh apart (a parameter b_hn, inside r ⊙ (·))."""
    return "b_hn" in cell_class(cell)().param_shapes(1, 1, True)


def _torch_names(num_layers: int, bidirectional: bool, bias: bool) -> list[tuple[Any, str, str]]:
    """(recurrence, torch name, gpubptt base name or bias kind) in torch's parameter order."""
    out = []
    for r in recurrences(num_layers, bidirectional):
        sfx = f"_l{r.layer}" + ("_reverse" if r.direction else "")
        out += [(r, "weight_ih" + sfx, "U"), (r, "weight_hh" + sfx, "W")]
        if bias:
            out += [(r, "bias_ih" + sfx, "bias_ih"), (r, "bias_hh" + sfx, "bias_hh")]
    return out


#: whether a torch.func transform (grad, vmap, …) is active: the forward cannot run under one (False where torch lacks
#: the check)
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def _tangent(t: Any) -> Any:
    """A forward-mode dual tensor's tangent, else None (``torch.autograd.forward_ad``)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent


#: whether torch.compile is tracing (torch.compiler's since torch 2.3, torch._utils' before): forward then hands
#: the call to Python through torch.compiler.disable, made only then (importing dynamo up front costs a second)
_is_compiling = getattr(torch.compiler, "is_compiling", None) or getattr(torch._utils, "is_compiling", lambda: False)


#: tensors with no memory of their own to compute on (torch.export's and the tracers' stand-ins)
_SYMBOLIC = ("FakeTensor", "FunctionalTensor")


class Recurrent(torch.nn.Module):
    """A gpubptt recurrent stack as a ``torch.nn`` module; see the module docstring.

    ``Recurrent(model, batch_first=False)`` wraps a gpubptt ``RNN`` (its output layer is not used;
    Parameters are made from its weights, torch's bias_hh zero); ``Recurrent.from_module(mod)`` takes
    an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``. ``backend`` "auto" runs NumPy for CPU tensors and CuPy
    for CUDA tensors; "numpy" or "cupy" insists. Shapes as torch's: x (T, B, D) (or (B, T, D) with
    ``batch_first``, or (T, D) unbatched), hx (L·dirs, B, H); output (T, B, H·dirs), h_n (L·dirs, B, H).
    """

    def __init__(
        self,
        model: RNN,
        *,
        batch_first: bool = False,
        backend: str = "auto",
        recompute: int | str | None = None,
        precision: str | None = None,
        _params: dict[str, torch.nn.Parameter] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, RNN):
            raise InputTypeError(f"Recurrent wraps a gpubptt.RNN, got {type(model).__name__}")
        if backend not in ("auto", "numpy", "cupy"):
            raise InputError(f"unknown backend {backend!r}; expected 'auto', 'numpy' or 'cupy'")
        recompute = check_recompute(recompute)
        if recompute == "auto":
            raise InputError("recompute takes None, 'sqrt' or an int (steps per segment), not 'auto'")
        if recompute is not None and unsupported_reason(model):
            raise InputError(unsupported_reason(model))
        if model.dropout > 0 and model.num_layers > 1:
            raise InputError(f"dropout={model.dropout} between layers: gpubptt.torch runs without dropout")
        self.cell = model.cell_name
        self.nonlinearity = model.nonlinearity
        self.input_size, self.hidden_size = model.input_size, model.hidden_size
        self.num_layers, self.bidirectional, self.bias = model.num_layers, model.bidirectional, model.bias
        self.batch_first, self.backend, self.recompute = check_bool(batch_first, "batch_first"), backend, recompute
        self.precision = model.precision if precision is None else precision  # checked by its setter
        self._names = _torch_names(self.num_layers, self.bidirectional, self.bias)
        self._pnames = tuple(name for _, name, _ in self._names)  # torch's parameter order
        self._grad_plan = _grad_plan(self._names, self.cell)  # made once: no name is formatted per call
        if _params is None:
            rnn_sd, _ = model.to_torch()
            _params = {name: torch.nn.Parameter(torch.as_tensor(np.array(rnn_sd[name]))) for name in self._pnames}
        for name in self._pnames:
            self.register_parameter(name, _params[name])
        self._models: dict[tuple[str, torch.dtype, int | None], RNN] = {}
        # per model: (the Parameters' identity when shared, the (bias_ih, bias_hh, b) views whose sum is refreshed
        # each call), or None before the first call
        self._shared: dict[tuple[str, torch.dtype, int | None], tuple[tuple, dict[str, Any]] | None] = {}
        self._last: tuple[torch.device, torch.dtype, Any, str] | None = None  # last call's device, dtype, key, backend
        #: (the Parameters' identity, their device, their dtype), checked when the identity changes
        self._checked: tuple[tuple, torch.device, torch.dtype] | None = None

    @property
    def precision(self) -> str:
        """The GEMMs' operand precision (``RNN.precision``): the model's unless given; tf32/bf16 run float32
        tensors. Assignable (checked, and normalised as ``RNN`` takes it); the next call runs it."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        self._precision = check_precision(value)

    @classmethod
    def from_module(
        cls, mod: torch.nn.Module, *, backend: str = "auto", recompute: int | str | None = None, precision: str = "fp32"
    ) -> Recurrent:
        """A Recurrent sharing ``mod``'s Parameters: ``nn.RNN`` (tanh or relu), ``nn.GRU`` or ``nn.LSTM`` with
        any layers, directions, bias and batch_first; ``precision`` as ``RNN``'s (float32 modules for tf32/bf16).
        Refused, naming the option: ``proj_size`` and dropout between layers (InputError); parameters that are
        not float32/float64, weights that are not Parameters (pruned, parametrized, None: prune or parametrize
        the Recurrent instead) and any other module, a subclass of these included (InputTypeError)."""
        # parametrize swaps in a class of its own (ParametrizedGRU); the weights it computes are refused below
        kind = type(mod).__bases__[0] if parametrize.is_parametrized(mod) else type(mod)
        cell = _CELLS.get(kind)
        if cell is None:
            raise InputTypeError(
                f"from_module takes a torch.nn.RNN, GRU or LSTM itself (a subclass may compute otherwise), got "
                f"{type(mod).__name__}"
            )
        if getattr(mod, "proj_size", 0):
            raise InputError(f"proj_size={mod.proj_size}: gpubptt's LSTM has no projection; use proj_size=0")
        if mod.dropout and mod.num_layers > 1:
            raise InputError(f"dropout={mod.dropout} between layers: gpubptt.torch runs without dropout (use 0)")
        names = _torch_names(mod.num_layers, mod.bidirectional, mod.bias)
        params = {name: getattr(mod, name) for _, name, _ in names}  # tied Parameters: one object, two names
        for name, p in params.items():
            if not isinstance(p, torch.nn.Parameter):
                what = _what(mod, name, p)
                hint = (
                    "; make the change permanent first (torch.nn.utils.prune.remove, "
                    "parametrize.remove_parametrizations) or make the Recurrent from the plain module and prune or "
                    "parametrize the Recurrent"
                )
                raise InputTypeError(
                    f"the {kind.__name__}'s {name} is {what}, not a Parameter: from_module shares the module's "
                    f"Parameters{hint if what.startswith(('pruned', 'parametrized')) else ''}"
                )
        dt = mod.weight_hh_l0.dtype
        if dt not in (torch.float32, torch.float64):
            raise InputTypeError(f"the module's parameters are {dt}; gpubptt runs float32 or float64")
        for k, v in params.items():
            interop.check_has_data(v, k)
        host = {k: v.detach().cpu().numpy() for k, v in params.items()}
        nonlinearity = getattr(mod, "nonlinearity", None) if cell_class(cell).takes_nonlinearity else None
        linear = {
            "weight": np.zeros((1, mod.hidden_size * (2 if mod.bidirectional else 1)), host["weight_hh_l0"].dtype)
        }
        model = RNN.from_torch(host, linear, cell=cell, nonlinearity=nonlinearity, backend="numpy")
        return cls(
            model,
            batch_first=mod.batch_first,
            backend=backend,
            recompute=recompute,
            precision=precision,
            _params=params,
        )

    def flatten_parameters(self) -> None:
        """Nothing to do (kept for model code that calls it on torch's modules, whose cuDNN wants one weight
        buffer): gpubptt reads the Parameters where they are."""

    def extra_repr(self) -> str:
        return (
            f"{self.cell}, {self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, batch_first={self.batch_first}, bidirectional={self.bidirectional}"
        )

    def _model(self, device: torch.device, dtype: torch.dtype, params: list[Any]) -> tuple[Any, RNN]:
        """(key, the gpubptt model that runs tensors of this device and dtype), built once per key from
        ``params`` (this call's weights in torch's order)."""
        last = self._last
        if (
            last
            and len(last) == 4
            and last[:2] == (device, dtype)
            and last[2][3] == self.precision
            and last[3] == self.backend
        ):
            return last[2], self._models[last[2]]  # the checks below passed for this pair and backend already
        want = "cupy" if device.type == "cuda" else "numpy"
        if device.type not in ("cpu", "cuda"):
            raise InputTypeError(f"gpubptt runs CPU or CUDA tensors, got device {device}")
        if self.backend != "auto" and self.backend != want:
            raise BackendMismatchError(
                f"the tensors are on {device}, but this Recurrent runs the {self.backend} backend "
                f"({'CUDA' if self.backend == 'cupy' else 'CPU'} tensors)"
            )
        if dtype not in (torch.float32, torch.float64):
            raise InputTypeError(f"the parameters are {dtype}; gpubptt runs float32 or float64")
        if dtype == torch.float64 and self.precision != "fp32":
            raise InputTypeError(
                f"this Recurrent runs precision={self.precision!r}, float32 only; the parameters are float64: "
                "convert the module to float32 or use precision='fp32'"
            )
        precision = self.precision  # checked when set; another value later builds a model of its own
        key = (want, dtype, device.index, precision)
        if key not in self._models:
            be = get_backend(want)
            dirs = 2 if self.bidirectional else 1
            host = {n: p.detach().cpu().numpy() for n, p in zip(self._pnames, params, strict=True)}
            with be.external_stream(None, device.index):  # the model's arrays on the tensors' device
                model = RNN.from_torch(
                    host, {"weight": np.zeros((1, self.hidden_size * dirs), host["weight_hh_l0"].dtype)},
                    cell=self.cell, backend=be, precision=precision if dtype == torch.float32 else None,
                    nonlinearity=self.nonlinearity if cell_class(self.cell).takes_nonlinearity else None,
                )  # fmt: skip
            model.step_kernels = None
            self._models[key] = model
            self._shared[key] = None
        self._last = (device, dtype, key, self.backend)
        return key, self._models[key]

    def _share(self, key: tuple[str, torch.dtype, int | None, str], model: RNN, params: tuple, ident: tuple) -> None:
        """Point ``model.params`` at the Parameters' memory and refresh the summed biases.

        The weights (and the GRU's b_hn) are views of the Parameters' storage (``_array``), made and
        checked (shape, finite) once, and made again only when a Parameter is replaced (another
        object, storage, shape or dtype: ``p.data = …``, ``module.to(…)``, assigning a new Parameter);
        in-place updates (optimizers, ``load_state_dict``) reach the model without a copy. Each call
        only adds torch's two biases of a recurrence into the model's b (``_bias_sums``).
        """
        shared = self._shared[key]
        if shared is None or shared[0] != ident:  # ident: as forward computed it (checked there: one device, dtype)
            xp = model.backend.xp
            arrays = {name: _array(p, xp) for (_, name, _), p in zip(self._names, params, strict=True)}
            self._check_named(arrays, xp)  # by torch's names, before they are folded into gpubptt's
            head = {k: model.params[k] for k in ("V", "c") if k in model.params}  # the unused output layer
            model.params = {**_fold(arrays, self._names, self.cell, self.hidden_size), **head}  # checked here
            sums = _bias_sums(model, arrays, self._names, self.cell, self.hidden_size)
            self._shared[key] = (ident, sums)
            return  # _fold summed the biases just now
        xp = model.backend.xp
        for b_ih, b_hh, b in shared[1]:
            xp.add(b_ih, b_hh, out=b)

    def _check_named(self, arrays: dict[str, Any], xp: Any) -> None:
        """Each replaced Parameter's shape and values under its torch name (``weight_hh_l1``), as ``from_module`` checks
        them: ShapeError, or InputError for NaN or infinity (one device-wide test per array, on replacement only)."""
        GH, H, dirs = cell_class(self.cell).gates * self.hidden_size, self.hidden_size, 1 + self.bidirectional
        for r, name, kind in self._names:
            a = arrays[name]
            want = (GH, self.input_size if r.layer == 0 else H * dirs) if kind == "U" else (GH, H) if kind == "W" else (
                GH,)  # fmt: skip
            if tuple(a.shape) != want:
                raise ShapeError(f"{name} must have shape {want}, got {tuple(a.shape)}")
            if not bool(xp.isfinite(a).all()):
                raise InputError(f"{name} contains NaN or infinity")

    def _check_input(self, x: Any, packed: bool = False) -> None:
        """x's feature size, and T and B ≥ 1, checked first as torch's module does and worded in the caller's layout
        (x as given: (T, B, D), (B, T, D) with batch_first, (T, D) unbatched, or a PackedSequence's data (N, D))."""
        shape = tuple(x.shape)
        unbatched = len(shape) == 2
        T, B = (1, 1) if packed else (shape[0], 1) if unbatched else shape[1::-1] if self.batch_first else shape[:2]
        if shape[-1] == self.input_size and T and B:
            return
        if packed:
            what = f"the PackedSequence's data of shape {shape}"
        else:
            layout = "(T, D) unbatched" if unbatched else "(B, T, D) with batch_first" if self.batch_first else (
                "(T, B, D)")  # fmt: skip
            what = f"x of shape {shape} read as {layout}"
        if shape[-1] != self.input_size:
            raise ShapeError(
                f"input.size(-1) must be equal to input_size: expected {self.input_size}, got {shape[-1]} in {what}"
            )
        if T == 0:
            raise ShapeError(f"{what} has no time steps (T = 0): a sequence needs at least one step")
        raise ShapeError(f"{what} is an empty batch (B = 0): gpubptt runs at least one sequence")

    def forward(self, x: Any, hx: Any = None, *, lengths: Any = None) -> tuple[Any, Any]:
        """(output, h_n) — an LSTM's (output, (h_n, c_n)) — as the torch module returns them.

        x (T, B, D) / (B, T, D) with batch_first / (T, D) unbatched, or a PackedSequence; hx (L·dirs, B, H)
        (an LSTM's (h0, c0)) or None; lengths (B,) ints (a tensor or array on the host) for padded x.
        """
        if _is_compiling():  # torch.compile: dynamo cannot trace NumPy / CuPy on the tensors' memory
            return torch.compiler.disable(self._forward)(x, hx, lengths)  # a graph break: Python runs it
        return self._forward(x, hx, lengths)

    def _forward(self, x: Any, hx: Any, lengths: Any) -> tuple[Any, Any]:
        inputs = (x.data if isinstance(x, PackedSequence) else x, *(hx if isinstance(hx, tuple) else (hx,)))
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
        if torch.jit.is_tracing() or exporting or any(type(t).__name__ in _SYMBOLIC for t in inputs):
            raise InputTypeError(
                "gpubptt.torch.Recurrent runs eagerly (and under torch.compile, as a graph break), not under "
                "torch.jit.trace or torch.export: its forward computes on the tensors' memory with NumPy or CuPy, "
                "which a trace cannot record (a forced trace would replay this call's weights)"
            )
        if _transforms_active() or any(isinstance(t, torch.Tensor) and _tangent(t) is not None for t in inputs):
            raise InputTypeError(
                "gpubptt.torch.Recurrent runs outside torch.func's transforms (grad, vjp, vmap, jacrev, …) and "
                "forward-mode AD (dual tensors): its forward computes on the tensors' memory, its backward is "
                "reverse mode only; take gradients with loss.backward() or torch.autograd.grad (functional_call "
                "without a transform works)"
            )
        packed = isinstance(x, PackedSequence)
        if packed:
            if lengths is not None:
                raise InputError("lengths= is for padded x; a PackedSequence carries its own lengths")
            self._check_input(x.data, packed=True)
            packed_in = x
            x, lens = pad_packed_sequence(x, batch_first=False)  # the batch in its given order
            lengths = lens.numpy()
            time_major = x
        else:
            if not isinstance(x, torch.Tensor):
                raise InputTypeError(f"x must be a torch.Tensor or PackedSequence, got {type(x).__name__}")
            if x.dim() not in (2, 3):
                raise ShapeError(f"x must be (T, B, D), (B, T, D) with batch_first, or (T, D); got {tuple(x.shape)}")
            self._check_input(x)
            time_major = x.transpose(0, 1) if self.batch_first and x.dim() == 3 else x
        unbatched = time_major.dim() == 2
        if unbatched:
            time_major = time_major.unsqueeze(1)
        B = time_major.shape[1]
        lstm = _carries_c(self.cell)
        h0 = c0 = None
        if hx is not None:
            if lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise InputTypeError("an LSTM's hx must be the pair (h0, c0)")
                h0, c0 = hx
            else:
                h0 = hx
            n = self.num_layers * (2 if self.bidirectional else 1)
            want = (n, self.hidden_size) if unbatched else (n, B, self.hidden_size)
            for what, t in (("h0", h0), ("c0", c0)):  # as torch: every layout checked, a one-layer one included
                if t is None and what == "c0" and not lstm:
                    continue
                if not isinstance(t, torch.Tensor):
                    raise InputTypeError(f"{what} must be a torch.Tensor of shape {want}, got {type(t).__name__}")
                if tuple(t.shape) != want:
                    layout = "(num_layers·directions, hidden_size) for unbatched x" if unbatched else (
                        "(num_layers·directions, B, hidden_size)")  # fmt: skip
                    raise ShapeError(f"{what} must have shape {want} {layout}, got {tuple(t.shape)}")
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = None if c0 is None else c0.unsqueeze(1)
        # the registered Parameters, replaced or not, or what a parametrization or pruning computes in their place
        # (a tensor that torch differentiates on to the Parameters underneath); tied ones under each of their names
        registered = self._parameters
        params = [p if (p := registered.get(name)) is not None else getattr(self, name, None) for name in self._pnames]
        for name, p in zip(self._pnames, params, strict=True):
            if not isinstance(p, torch.Tensor):
                raise InputTypeError(
                    f"{name} is {_what(self, name, p)}, not a tensor: this Recurrent runs every one of torch's "
                    f"parameters {', '.join(self._pnames)}: assign it a Parameter (for none of the biases: bias=False)"
                )
        # the Parameters' identity: their common device and dtype are checked again only when it changes
        ident = identity(params)
        if self._checked is None or self._checked[0] != ident:
            self._checked = (ident, *_common_device_dtype(params, self._pnames))
        _, device, dt = self._checked
        for what, t in (("x", time_major), ("h0", h0), ("c0", c0)):
            if t is None:
                continue
            if t.device != device:
                devices = {str(t.device) for t in [time_major, h0, c0, params[0]] if t is not None}
                raise BackendMismatchError(
                    f"x, hx and the parameters must be on one device; got {', '.join(sorted(devices))}"
                )
            if t.dtype != dt:
                raise InputTypeError(f"{what} is {t.dtype} but the parameters are {dt}: convert one of them")
        if lengths is not None:
            lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths)
            if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
                raise ShapeError(f"lengths must be (B,) = ({B},) integers, got {lengths.dtype} {lengths.shape}")
        key, model = self._model(device, dt, params)
        # no backward will run (torch.no_grad, or nothing needs a gradient): the forward's buffers go straight back
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (time_major, h0, c0, *params))
        out, h_n, c_n = _Pullback.apply((self, key, model, lengths, ident, grad), time_major, h0, c0, *params)
        if packed:  # packed back in the input's own order (as torch's modules: its sorted_indices, ties as they were)
            order = packed_in.sorted_indices
            ordered = out if order is None else out.index_select(1, order)
            lens = torch.as_tensor(lengths) if order is None else torch.as_tensor(lengths)[order.cpu()]
            data = pack_padded_sequence(ordered, lens, enforce_sorted=True).data
            out = PackedSequence(data, packed_in.batch_sizes, order, packed_in.unsorted_indices)
        elif unbatched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return (out, (h_n, c_n)) if lstm else (out, h_n)


def _what(mod: torch.nn.Module, name: str, value: Any) -> str:
    """How a module's weight ``name`` that is not a Parameter came about, in words (for a refusal)."""
    if parametrize.is_parametrized(mod, name):
        return "parametrized (torch.nn.utils.parametrize)"
    if hasattr(mod, name + "_orig") and hasattr(mod, name + "_mask"):
        return "pruned (torch.nn.utils.prune)"
    return "None" if value is None else f"a {type(value).__name__}"


def _fold(params: dict[str, Any], names: list[tuple[Any, str, str]], cell: str, H: int) -> dict[str, Any]:
    """gpubptt's parameters from torch's (arrays of one backend): b = bias_ih + bias_hh (the GRU's n third
    of bias_hh stays apart as b_hn); a zero (1, H·dirs) V, the unused output layer."""
    out: dict[str, Any] = {}
    for r, name, kind in names:
        if kind in ("U", "W"):
            out[r.name(kind)] = params[name]
        elif kind == "bias_hh":
            b_ih, b_hh = params[name.replace("bias_hh", "bias_ih")], params[name]
            if _split_b_hn(cell):
                b = b_ih.copy()
                b[: 2 * H] += b_hh[: 2 * H]
                out[r.name("b")], out[r.name("b_hn")] = b, b_hh[2 * H :]
            else:
                out[r.name("b")] = b_ih + b_hh
    return out


def _bias_sums(
    model: RNN, arrays: dict[str, Any], names: list[tuple[Any, str, str]], cell: str, H: int
) -> list[tuple[Any, Any, Any]]:
    """(bias_ih, bias_hh, b) views, one per recurrence with biases, such that b = bias_ih + bias_hh is the
    model's summed bias again (the GRU's: its first 2H rows; its last H rows are bias_ih's alone and b_hn is
    a view of bias_hh): each call adds them in place, as torch's biases may have changed in place."""
    out = []
    for r, name, kind in names:
        if kind == "bias_hh":
            b_ih, b_hh, b = arrays[name.replace("bias_hh", "bias_ih")], arrays[name], model.params[r.name("b")]
            if _split_b_hn(cell):
                zero = model.backend.xp.zeros(H, dtype=b.dtype)
                out += [(b_ih[: 2 * H], b_hh[: 2 * H], b[: 2 * H]), (b_ih[2 * H :], zero, b[2 * H :])]
            else:
                out.append((b_ih, b_hh, b))
    return out


def _common_device_dtype(params: list[Any], names: tuple[str, ...]) -> tuple[torch.device, torch.dtype]:
    """The one device and dtype of the Parameters (in torch's order, named ``names``); refused otherwise."""
    device, dt = params[0].device, params[0].dtype
    if any(p.device != device for p in params):
        devices = {str(p.device) for p in params}
        raise BackendMismatchError(f"x, hx and the parameters must be on one device; got {', '.join(sorted(devices))}")
    for name, p in zip(names, params, strict=True):
        if p.dtype != dt:
            raise InputTypeError(f"parameter {name} is {p.dtype} but {names[0]} is {dt}")
    return device, dt


def _grad_plan(names: list[tuple[Any, str, str]], cell: str) -> list[tuple[str, str | None, bool]]:
    """Per torch Parameter, in torch's order, where its gradient comes from in the pullback's dict: (gpubptt
    name, the GRU's b_hn name or None, whether it is a copy). Both biases of a recurrence get db; bias_hh its
    own copy (the GRU's: [db_r, db_z, db_hn]): torch keeps the arrays as the Parameters' .grad, and an
    in-place change of one (accumulation, clipping) must not reach the other."""
    plan: list[tuple[str, str | None, bool]] = []
    for r, _name, kind in names:
        if kind in ("U", "W"):
            plan.append((r.name(kind), None, False))
        elif kind == "bias_ih":
            plan.append((r.name("b"), None, False))
        else:
            plan.append((r.name("b"), r.name("b_hn") if _split_b_hn(cell) else None, True))
    return plan
