"""The model's parameters: a mapping that keeps every entry the shape, dtype and backend the model needs.

    >>> import numpy as np, gpubptt
    >>> model = gpubptt.RNN(4, 3, 2, backend="numpy", seed=0)
    >>> model.params["W"] = np.eye(3)            # (H, H): accepted, cast to the model's float32
    >>> model.params["W"] = np.eye(4)
    Traceback (most recent call last):
    ...
    gpubptt.errors.ShapeError: parameter W must have shape (3, 3), got (4, 4)

Assigning replaces the array (the model reads the new one on its next call); updating in place
(``model.params["W"] *= 0.5``, what the optimizers do) keeps it. Names cannot be added or removed:
the set of parameters is fixed when the model is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import Backend
from .cells import ElmanCell
from .errors import InputError, InputTypeError, ShapeError

__all__ = [
    "PARAM_NAMES", "RESERVED_NAMES", "Params", "Recurrence", "architecture_of", "cell_param_shapes", "param_shapes",
    "recurrences",
]  # fmt: skip

PARAM_NAMES = ("U", "W", "V", "b", "c")


@dataclass(frozen=True)
class Recurrence:
    """One recurrence of a stack: layer ``layer`` (0 = the input's), ``direction`` 0 (forward) or 1 (reverse).

    ``suffix`` names its parameters: "" for layer 0 forward (U, W, b as in the one-layer model),
    then "_l{layer}" for layers above 0 and "_reverse" for the reverse direction, as torch's names
    (``weight_hh_l1_reverse`` is W_l1_reverse). ``index`` = layer·dirs + direction, its row of s0.
    """

    layer: int
    direction: int
    index: int

    @property
    def suffix(self) -> str:
        return ("" if self.layer == 0 else f"_l{self.layer}") + ("_reverse" if self.direction else "")

    def name(self, base: str) -> str:
        """The parameter ``base`` ("U", "W", "b") of this recurrence: e.g. "W_l1_reverse"."""
        return base + self.suffix


def recurrences(num_layers: int = 1, bidirectional: bool = False) -> list[Recurrence]:
    """The recurrences of a stack in torch's order: layer by layer, forward before reverse."""
    dirs = 2 if bidirectional else 1
    return [Recurrence(l, d, l * dirs + d) for l in range(num_layers) for d in range(dirs)]


def param_shapes(
    D: int, H: int, K: int, bias: bool, cell: Any = None, *, num_layers: int = 1, bidirectional: bool = False
) -> dict[str, tuple[int, ...]]:
    """The model's schema, {name: shape}: each recurrence's cell parameters (Elman: U (H, D_l),
    W (H, H), b (H,); D_0 = D, D_l = H·dirs above), then the output layer's V (K, H·dirs), then the
    biases (b of each recurrence, c (K,)) only with ``bias``. One layer, one direction: U, W, V, b, c.

    The one place the parameter shapes are written: the model, ``from_params``, checkpoints and
    gradcheck all read them here.
    """
    cell = cell or ElmanCell()
    dirs = 2 if bidirectional else 1
    weights: dict[str, tuple[int, ...]] = {}
    biases: dict[str, tuple[int, ...]] = {}
    bias_names = cell.bias_names()  # the parameters that exist only with bias, not every 1-d one (IndRNN's w)
    for r in recurrences(num_layers, bidirectional):
        for k, shape in cell_param_shapes(cell, D if r.layer == 0 else H * dirs, H, bias).items():
            (biases if k in bias_names else weights)[r.name(k)] = shape
    weights["V"] = (K, H * dirs)
    if bias:
        biases["c"] = (K,)
    return {**weights, **biases}


#: names a cell's parameters may not take: the output layer's, the states' gradients' (s0 and the cell's extra state
#: are added to the gradients), and names ending as the engine's layer and direction suffixes do
RESERVED_NAMES = ("V", "c", "s0")
_SUFFIX = re.compile(r"(_l[0-9]+|_reverse)$")


def cell_param_shapes(cell: Any, D: int, H: int, bias: bool) -> dict[str, tuple[int, ...]]:
    """``cell.param_shapes(D, H, bias)`` checked, shapes as tuples of ints: InputError naming the cell and what its
    declaration gets wrong (a reserved name, a shape not of positive ints, U not (gates·H, D), an ``input_bias``
    that is not a (gates·H,) parameter), before anything is built."""
    shapes = cell.param_shapes(D, H, bias)
    what = f"cell {cell.option!r}: param_shapes({D}, {H}, {bias})"
    if not isinstance(shapes, Mapping):
        raise InputError(f"{what} must return a dict {{name: shape}}, got {type(shapes).__name__}")
    reserved = (*RESERVED_NAMES, *([cell.extra_state] if cell.extra_state else []))
    out: dict[str, tuple[int, ...]] = {}
    for k, shape in shapes.items():
        if not isinstance(k, str) or not k:
            raise InputError(f"{what} names a parameter {k!r}; expected a non-empty str")
        if k in reserved or _SUFFIX.search(k):
            raise InputError(
                f"{what} names a parameter {k!r}, which the model reserves (its own {', '.join(reserved)}, and names "
                "ending in _l<n> or _reverse, the suffixes it adds per layer and direction); rename it"
            )
        try:
            dims = tuple(shape)
        except TypeError:
            dims = (shape,)
        if not dims or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in dims):
            raise InputError(f"{what} gives {k!r} the shape {shape!r}; expected a tuple of ints ≥ 1")
        out[k] = tuple(int(n) for n in dims)
    G = cell.gates
    if out.get("U") != (G * H, D):
        raise InputError(
            f"{what} must give U the shape (gates·H, D) = ({G * H}, {D}) (gates = {G}: the input projection's rows), "
            f"got {out.get('U', 'no U')}"
        )
    if bias and cell.input_bias and out.get(cell.input_bias) != (G * H,):
        raise InputError(
            f"{what}: input_bias = {cell.input_bias!r} must name a parameter of shape (gates·H,) = ({G * H},), "
            f"got {out.get(cell.input_bias, 'no such parameter')}"
        )
    return out


def architecture_of(names: Any) -> tuple[int, bool]:
    """(num_layers, bidirectional) from a set of parameter names (as ``param_shapes`` writes them)."""
    names = set(names)
    bidirectional = "U_reverse" in names
    layers = 1
    while f"U_l{layers}" in names:
        layers += 1
    return layers, bidirectional


def finite_in(a: Any, dtype: np.dtype, *, xp: Any) -> Any:
    """``a`` cast to ``dtype`` and whether every value is finite there (a 0-d bool array, no sync).

    A finite float64 value beyond float32's range becomes inf in the cast: checking the cast array,
    not the original, is what catches it.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is reported by the caller
        cast = a.astype(dtype, copy=False)
    verdicts = [xp.isfinite(block).all() for block in _blocks(cast)]  # 0-d each, on the device: no sync
    ok = verdicts[0]
    for v in verdicts[1:]:
        ok = ok & v
    return cast, ok


def _blocks(a: Any) -> Any:
    """Views of ``a`` of at most FINITE_BLOCK elements each (more only for a last axis longer than that), covering
    it: leading-axis slices, going down an axis where one slice of the leading axis is already too large."""
    if a.ndim == 0 or a.size <= FINITE_BLOCK:
        yield a
        return
    row = a.size // a.shape[0]
    if row > FINITE_BLOCK and a.ndim > 1:
        for i in range(a.shape[0]):
            yield from _blocks(a[i])
        return
    step = max(1, FINITE_BLOCK // row)
    for i in range(0, a.shape[0], step):
        yield a[i : i + step]


#: the most elements ``finite_in`` tests at once: its boolean mask of a long input stays this small (64 KiB)
FINITE_BLOCK = 1 << 16


def nonfinite_reason(a: Any, dtype: np.dtype, *, xp: Any) -> str:
    """Why ``a`` is not finite in ``dtype``: NaN/inf already, or finite values past dtype's range."""
    if not bool(xp.isfinite(a).all()):
        return "contains NaN or infinity"
    biggest, limit = float(xp.abs(a).max()), float(np.finfo(dtype).max)
    return f"has values too large for {dtype.name} (|value| up to {biggest:.3g}; {dtype.name} holds {limit:.3g})"


class Params(MutableMapping):
    """The parameter arrays of one model, keyed "U", "W", "V" (and "b", "c" with biases).

    Shapes U (H, D), W (H, H), V (K, H), b (H,), c (K,). Assignments are checked: the name must
    be one of the model's, the array of the model's backend (a list is copied in; a NumPy array
    into a CuPy model is refused like any input from another library), floating point, finite in
    the model's dtype and of the expected shape. It is stored in the model's dtype (as given,
    without a copy, when it already is a writable backend array of that dtype; a read-only array
    is copied: two names given one array share it, which an optimizer refuses). Nothing changes when a
    check fails.
    """

    def __init__(self, be: Backend, dtype: np.dtype, shapes: dict[str, tuple[int, ...]], arrays: dict[str, Any]):
        self._be, self._dtype, self._shapes = be, dtype, dict(shapes)
        self._arrays: dict[str, Any] = {}
        for k in shapes:
            self._arrays[k] = self._checked(k, arrays[k])

    def _checked(self, name: str, a: Any) -> Any:
        be, xp = self._be, self._be.xp
        if name not in self._shapes:
            raise InputError(f"unknown parameter {name!r}; this model has {', '.join(self._shapes)}")
        be.check_native(a, f"parameter {name}")
        a = be.asarray(a)
        if a.dtype.kind != "f":
            raise InputTypeError(f"parameter {name} must be floating point, got dtype {a.dtype}")
        if tuple(a.shape) != self._shapes[name]:
            raise ShapeError(f"parameter {name} must have shape {self._shapes[name]}, got {tuple(a.shape)}")
        cast, finite = finite_in(a, self._dtype, xp=xp)
        if not bool(finite):  # one host sync per assignment, never in a training step
            raise InputError(f"parameter {name} {nonfinite_reason(a, self._dtype, xp=xp)}")
        if not getattr(getattr(cast, "flags", None), "writeable", True):
            cast = cast.copy()  # a read-only array: the optimizers update parameters in place, so keep a copy
        return cast

    def __getitem__(self, name: str) -> Any:
        return self._arrays[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self._arrays[name] = self._checked(name, value)

    def __delitem__(self, name: str) -> None:
        raise InputError(f"parameters cannot be removed (tried {name!r}); build a new model instead")

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def copy(self) -> dict[str, Any]:
        """A plain dict of the same arrays (not copied), like ``dict.copy``."""
        return dict(self._arrays)

    def __deepcopy__(self, memo: dict) -> dict[str, Any]:
        """A plain dict of copies of the arrays (the backend and its locks are not copied)."""
        return {k: v.copy() for k, v in self._arrays.items()}

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """``pickle`` (and ``torch.save``) write a plain dict of the arrays, as ``__deepcopy__`` gives one."""
        return dict, (dict(self._arrays),)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """``dict.update``'s arguments (a mapping or (name, array) pairs, and keywords): every entry is checked before
        any parameter changes, so a refused one leaves them all as they were."""
        entries = dict(*args, **kwargs)
        checked = {k: self._checked(k, v) for k, v in entries.items()}
        self._arrays.update(checked)

    def __eq__(self, other: object) -> bool:
        """Equal to a mapping of the same names whose arrays hold the same values (and shapes)."""
        if not isinstance(other, Mapping):
            return NotImplemented
        xp = self._be.xp
        return set(other) == set(self._arrays) and all(
            tuple(getattr(other[k], "shape", ())) == tuple(a.shape) and bool(xp.array_equal(a, other[k]))
            for k, a in self._arrays.items()
        )

    __hash__ = None  # type: ignore[assignment]  # a mutable mapping

    def replace_all(self, arrays: Mapping[str, Any]) -> None:
        """Assign every parameter at once: all are checked before any is replaced (same names required)."""
        if not isinstance(arrays, Mapping) or set(arrays) != set(self._shapes):
            got = sorted(map(str, arrays)) if isinstance(arrays, Mapping) else type(arrays).__name__
            raise InputError(f"parameters must be given as a mapping with exactly {', '.join(self._shapes)}; got {got}")
        checked = {k: self._checked(k, arrays[k]) for k in self._shapes}
        self._arrays.update(checked)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._arrays.items())
        return f"Params({inner}; {self._dtype.name} on {self._be.name})"
