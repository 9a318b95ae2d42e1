"""The cell contract: the ``Cell`` base class and the registry of cells by option name.

A cell class declares what it is, and the rest of gpubptt reads it from there (the CLI's choices,
checkpoint validation, ``from_params``, init, torch interchange, bench FLOPs, the memory estimate,
the diagnostics). Registering a cell is one decorator::

    @register_cell
    class MyCell(Cell):
        option = "mine"                                   # RNN(cell="mine"), --cell mine
        def param_shapes(self, D, H, bias): ...           # {"U": (H, D), ...}
        def run_forward(self, pre, p, S, aux, *, be, scratch, step_kernels): ...
        def run_backward(self, G, p, S, aux, *, be, work, scratch, step_kernels, truncate, lanes, grads, ds0,
                         d_extra=None): ...
        def step_jacobian(self, p, S, aux): ...            # dense ∂s_t/∂s_{t−1}, for the diagnostics

Everything else has a default here; a cell overrides only what it is. See ``gpubptt.cells`` for what
each method receives.
"""

from __future__ import annotations

import inspect
import math
from abc import ABCMeta, abstractmethod
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError

__all__ = ["INITS", "Cell", "cell_class", "cell_names", "make_cell", "register_cell"]

#: The init schemes every cell has (a cell may add its own to ``Cell.inits``).
INITS = ("wildml", "torch")

_REGISTRY: dict[str, type[Cell]] = {}


class _FixedOnceBuilt(ABCMeta):
    """Cells are fixed once their constructor returns (``Cell.__setattr__``): a model's architecture holds its cell,
    and a cell is its class and options (its hash too), so an option changed on a live cell would change what a
    model computes without its config, copies or checkpoints saying so."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        cell = super().__call__(*args, **kwargs)
        object.__setattr__(cell, "_built", True)
        return cell


class Cell(metaclass=_FixedOnceBuilt):
    """A recurrent cell: its identity, parameters, init, buffers, recurrences, step Jacobian and FLOPs.

    Class attributes (override what differs): ``option`` (the ``cell=`` name), ``name`` (the name a
    checkpoint records; defaults to ``option``), ``gates`` (rows of U and W per hidden unit),
    ``input_bias`` (the bias the engine adds in the input projection, or None), ``extra_state``
    (required, no default: False, or the name of a state carried beside s: an LSTM's "c0"), ``torch_module`` (the
    ``torch.nn`` module with the same parameters, e.g. "nn.GRU"; None: interchange is refused),
    ``takes_nonlinearity`` (whether the ``nonlinearity`` option applies), ``inits``.
    """

    option: ClassVar[str] = ""
    name: ClassVar[str] = ""
    gates: ClassVar[int] = 1
    input_bias: ClassVar[str | None] = "b"
    #: required of every cell (no default: recomputation refuses a cell that does not say)
    extra_state: ClassVar[str | bool]
    torch_module: ClassVar[str | None] = None
    takes_nonlinearity: ClassVar[bool] = False
    inits: ClassVar[tuple[str, ...]] = INITS
    #: φ where the cell takes one (``takes_nonlinearity``), else None
    nonlinearity: str | None = None

    # -- identity: a cell is its class and its options --------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        """Set in the constructor only: a built cell is fixed (AttributeError naming how to get another)."""
        if self.__dict__.get("_built"):
            raise AttributeError(
                f"a cell is fixed once built (tried to set {name!r} on {self!r}): build another, e.g. "
                f"make_cell({self.option!r}, ...), and a model with it"
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self.__dict__.get("_built"):
            raise AttributeError(f"a cell is fixed once built (tried to delete {name!r} from {self!r})")
        object.__delattr__(self, name)

    def options(self) -> dict[str, Any]:
        """The cell's options beyond the class (``nonlinearity`` for the Elman cell); {} for none."""
        return {}

    @classmethod
    def from_options(cls, nonlinearity: str | None = None, **options: Any) -> Cell:
        """The cell of ``RNN(cell=option, nonlinearity=..., cell_options)``: ``cls(**options)``, the constructor
        taking each of ``options()``'s keys as a keyword (how a checkpoint's recorded options rebuild the cell);
        InputError on a bad option. A cell whose constructor differs overrides this."""
        if nonlinearity is not None:
            raise InputError(
                f"nonlinearity does not apply to cell={cls.option!r} (its math fixes its activations; leave it "
                f"unset), got nonlinearity={nonlinearity!r}"
            )
        if options and cls.options is Cell.options:  # the cell declares no options
            raise InputError(f"cell {cls.option!r} takes no options, got {sorted(options)}")
        try:
            return cls(**options)
        except TypeError as exc:  # an option the constructor does not take, or one it needs and was not given
            given = f"the options {sorted(options)}" if options else "no options"
            raise InputError(f"cell {cls.option!r} cannot be built from {given} ({exc})") from None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.options().items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"

    # -- parameters ----------------------------------------------------------------------------
    @abstractmethod
    def param_shapes(self, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
        """One recurrence's parameters by base name: e.g. U (G·H, D), W (G·H, H), b (G·H,) with ``bias``."""

    def bias_names(self) -> set[str]:
        """The base names that exist only with ``bias`` (they sort with the biases, after V)."""
        return set(self.param_shapes(1, 1, True)) - set(self.param_shapes(1, 1, False))

    def init_bounds(self, base: str, shape: tuple[int, ...], scheme: str, H: int) -> tuple[float, float] | None:
        """The uniform range a parameter starts in under ``scheme``; None: zeros (no random draw).

        Default: "wildml" U ~ U(±1/√D_l), any other weight U(±1/√H), biases zero; "torch" every
        parameter U(±1/√H), as ``torch.nn.RNN``/``GRU``/``LSTM``.
        """
        if scheme == "torch":
            a = 1 / np.sqrt(H)
        elif base in self.bias_names():
            return None
        else:
            a = 1 / np.sqrt(shape[1]) if base == "U" else 1 / np.sqrt(H)
        return (-a, a)

    def constrain(self, p: dict[str, Any], *, xp: Any) -> None:
        """Project one recurrence's parameters (by base name, in place) onto the cell's constraint set: an optimizer
        step's new values, before they land (a failing projection changes nothing); a no-op for an unconstrained
        cell."""
        return None

    def constraint_violation(self, params: dict[str, Any]) -> str | None:
        """Why the model's parameters (host arrays by full name, every recurrence's) lie outside the set
        ``constrain`` keeps them in, or None: a checkpoint that breaks it was not written by training."""
        return None

    # -- the engine's interface ------------------------------------------------------------------
    def buffers(self, T: int, B: int, H: int, *, xp: Any, dtype: Any) -> dict[str, Any]:
        """Arrays the cell keeps from forward to backward besides the states S (T+1, B, H); none by default."""
        return {}

    def load(self, aux: dict[str, Any], state0: Any) -> None:
        """Set any state beyond s0 before a forward (none by default)."""
        return None

    def cell_states(self, aux: dict[str, Any]) -> Any:
        """That state at every step, (T+1, B, H) like S, or None (none by default)."""
        return None

    def projection_buffer(self, aux: dict[str, Any], be: Any) -> Any:
        """Where the engine writes the input projection for this recurrence's forward: None (the default), its
        own shared ``pre``; or one of the cell's ``buffers`` (T, B, gates·H), which ``run_forward`` then receives
        as pre and may overwrite in place (the LSTM's gates, on the NumPy backend's compiled step loops)."""
        return None

    def adds_input_bias(self, be: Any) -> bool:
        """Whether ``run_forward`` adds the input bias (``input_bias``, from its parameters) to pre itself, in the
        step loop that reads each step's projection anyway, so that the engine's projection leaves it out (one pass
        over the (T, B, gates·H) projection less): False, the default; the LSTM's, on the NumPy backend's compiled
        step loops (``projection_buffer``)."""
        return False

    @abstractmethod
    def run_forward(
        self, pre: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Any, scratch: Any, step_kernels: str
    ) -> None:
        """All steps: pre (T, B, gates·H) = U x_t + input bias (without it where ``adds_input_bias``); S (T+1, B, H)
        with S[0] = s0, S[1:] written."""

    @abstractmethod
    def run_backward(
        self, G: Any, p: dict[str, Any], S: Any, aux: dict[str, Any], *, be: Any, work: Any, scratch: Any,
        step_kernels: str, truncate: int | None, lanes: Any, grads: dict[str, Any], ds0: Any,
        d_extra: dict[int, list[tuple[Any, Any]]] | None = None,
    ) -> Any:  # fmt: skip
        """BPTT over all steps: G (T, B, H) = ∂E/∂s_t from above → ∂E/∂pre (T, B, gates·H); see ``gpubptt.cells``.
        The cell writes every entry of ``grads`` (they are not zeroed before). ``d_extra`` (only for a cell with an
        ``extra_state``; None: none) {t: [(rows, values)]}: direct terms ∂E/∂(extra state at step t) to add, for the
        batch rows ``rows`` (a slice or an index array) with values (len(rows), H)."""

    def activate(self, a: Any, *, xp: Any) -> Any:
        """φ(a) for a cell whose step is s_t = φ(pre_t + recurrent term) (sampling's fast path); None else."""
        return None

    # -- what the diagnostics, bench and memory read ----------------------------------------------
    @abstractmethod
    def step_jacobian(self, p: dict[str, np.ndarray], S: np.ndarray, aux: dict[str, np.ndarray]) -> np.ndarray:
        """J (T, B, n, n): ∂state_t/∂state_{t−1} per step and example, dense, from the forward's own buffers.

        p the recurrence's parameters (host arrays, by base name); S (T+1, B, H) and ``aux`` (the
        cell's buffers) on the host after a forward. n = H, or the size of the whole state (2H for
        an LSTM's [h, c], h first).
        """

    def flops_per_step(self, B: int, D: int, H: int, *, backward: bool) -> int:
        """Multiply-add FLOPs (×2) of one recurrence for one step on B rows with D_l = D inputs (D = 0 for token
        inputs: a gather): forward U x and W s; backward dU, the recurrent products and dW. Default: a
        dense W (G·H, H) as the Elman and gated cells have; the elementwise math is not counted."""
        G = self.gates
        return 2 * B * H * G * (D + 2 * H) if backward else 2 * B * H * G * (D + H)

    def sequential_flops_per_step(self, B: int, H: int) -> int:
        """FLOPs of one step's products that wait on the step before: forward W s and backward δ W, 4·B·G·H² for a
        dense W (G·H, H) (the benchmarks charge them at the rate of back-to-back (B, H)×(H, G·H) GEMMs)."""
        return 4 * B * self.gates * H * H

    def buffer_elements(self, T: int, B: int, H: int) -> int:
        """Elements of ``buffers(T, B, H)``, counted without allocating (what the memory estimate adds)."""
        return sum(math.prod(a.shape) for a in self.buffers(T, B, H, xp=_Sizer, dtype=np.float64).values())


class _Shape:
    """A shape only: no array, so sizes beyond any address space are counted too (Python ints: no overflow)."""

    def __init__(self, shape: Any, dtype: Any = None) -> None:
        self.shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)


class _Sizer:
    """An array module whose ``empty``/``zeros``/``ones`` build shapes without memory."""

    empty = zeros = ones = _Shape


def register_cell(cls: type[Cell]) -> type[Cell]:
    """Class decorator: make ``cls`` a ``cell=`` option under ``cls.option`` (its ``name``, what checkpoints record,
    defaults to it, not to a registered parent class's). InputError for an abstract class, an ``extra_state`` cell
    whose ``run_backward`` does not take ``d_extra``, or an option or name another registered cell has."""
    if not (isinstance(cls, type) and issubclass(cls, Cell)) or not cls.option or not hasattr(cls, "extra_state"):
        raise InputError(
            f"register_cell takes a Cell subclass with an option name and extra_state (False or a name), got {cls!r}"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise InputError(f"register_cell: cell {cls.option!r} ({cls.__name__}) does not define {missing}")
    if cls.extra_state and not _takes(cls.run_backward, "d_extra"):
        raise InputError(
            f"register_cell: cell {cls.option!r} carries {cls.extra_state!r}, so its run_backward must take the "
            "keyword d_extra (direct terms on that state: recomputation and the pullback pass them; see "
            "Cell.run_backward)"
        )
    if cls.option in _REGISTRY and _REGISTRY[cls.option] is not cls:
        raise InputError(f"a cell named {cls.option!r} is already registered ({_REGISTRY[cls.option].__name__})")
    if not cls.__dict__.get("name"):  # its own, not a registered parent's: a checkpoint records it
        cls.name = cls.option
    twin = next((c for c in _REGISTRY.values() if c.name == cls.name and c is not cls), None)
    if twin is not None:
        raise InputError(f"the recorded name {cls.name!r} is already that of cell {twin.option!r} ({twin.__name__})")
    _REGISTRY[cls.option] = cls
    return cls


def _takes(fn: Any, keyword: str) -> bool:
    """Whether ``fn`` accepts ``keyword`` (by that name, or through ``**kwargs``)."""
    for follow in (False, True):  # a decorator's wrapper (what is called) and the function it wraps: both take it
        try:
            params = inspect.signature(fn, follow_wrapped=follow).parameters.values()
        except (TypeError, ValueError):  # no signature to read: let the call say
            continue
        if not any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return False
    return True


def cell_names() -> tuple[str, ...]:
    """The registered ``cell=`` options, in registration order ("rnn", "gru", "lstm", "indrnn", …)."""
    return tuple(_REGISTRY)


def cell_class(name: Any, *, recorded: bool = False) -> type[Cell]:
    """The cell class of a ``cell=`` option ("rnn"), or with ``recorded`` of the name a checkpoint records
    (the class's ``name``: "elman"); InputError naming the choices else."""
    if isinstance(name, str):
        for cls in _REGISTRY.values():
            if name == (cls.name if recorded else cls.option):
                return cls
    known = [c.name if recorded else c.option for c in _REGISTRY.values()]
    raise InputError(f"unknown cell {name!r}; expected one of {', '.join(known)}")


def make_cell(cell: Any = "rnn", nonlinearity: str | None = None, **options: Any) -> Cell:
    """The cell object of a ``cell=`` option (or a ``Cell`` instance, returned as is); InputError on a bad option."""
    if isinstance(cell, Cell):
        if nonlinearity is not None and nonlinearity != cell.nonlinearity:
            raise InputError(
                f"nonlinearity={nonlinearity!r} given with the cell instance {cell!r}: set it on the cell instead"
            )
        return cell
    return cell_class(cell).from_options(nonlinearity, **options)
