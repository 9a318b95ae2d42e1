"""Optimizers, gradient clipping and the non-finite guard: the one place that updates weights in place.

    SGD       v ← μ v + g                      θ ← θ − lr v              (μ = 0: plain SGD)
    Adagrad   G ← G + g²                       θ ← θ − lr g / √(G + ε)    (min-char-rnn's setting)
    Adam      m ← β₁m + (1−β₁)g   v ← β₂v + (1−β₂)g²
              θ ← θ − lr m̂ / (√v̂ + ε),   m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)

Weight decay λ (``weight_decay``, every optimizer, default 0) is decoupled, as AdamW: each step first
shrinks every parameter, θ ← θ − lr·λ·θ, then applies the update above to the gradient alone. With
Adam this is AdamW (``torch.optim.AdamW``); with plain SGD it equals an L2 penalty λ/2·‖θ‖² on the
loss; with momentum or Adagrad the decay, unlike an L2 penalty, never enters the statistics.
Every parameter decays, biases included (as torch's optimizers given ``model.parameters()``).

Every optimizer writes into the arrays of ``params`` (the model's own arrays) and into its state
arrays, all on the model's backend. Before touching anything, ``step`` checks that the loss and
every gradient are finite, and that the updated parameters are: the update is computed into
scratch arrays first, and ONE small device-to-host transfer per step (never inside the time loops)
reads the gradients' norms, the loss and whether every updated parameter is finite; it also hands
back the loss and gradient norm as host floats for progress reports. Only then are the new values
copied into the parameters and the new state swapped in. A non-finite step (a NaN loss, an
infinite gradient, or finite gradients whose update overflows the weights) raises NonFiniteError
naming the step and the cause, or is skipped when ``on_nonfinite="skip"``; either way weights, state
and the step counter are left exactly as they were. The learning rate must lie in (0, LR_MAX].

    >>> import numpy as np, gpubptt
    >>> from gpubptt.training.optim import SGD
    >>> model = gpubptt.RNN(3, 4, 3, backend="numpy", seed=0)
    >>> opt = SGD(model, lr=0.1)
    >>> loss, grads = model.loss_and_grads(np.zeros((5, 2), dtype=np.int64), np.ones((5, 2), dtype=np.int64))
    >>> opt.step(grads, loss=loss).applied
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._io import sigint_deferred
from ..backend import Backend, get_backend
from ..errors import InputError, InputTypeError, ShapeError
from ._norms import STATE_KEYS, clip_grad_norm, global_grad_norm  # noqa: F401  (STATE_KEYS: as before)
from ._optim_settings import (
    LR_MAX,
    NUMBER,
    _check_betas,
    _check_decay,
    _check_eps,
    _check_lr,
    _check_real,
    _check_scalar,
    _check_unit,
    _check_unshared,
    _param_grads,
    _takes_values,
)

__all__ = [
    "LR_MAX",
    "OPTIMIZERS",
    "SGD",
    "Adagrad",
    "Adam",
    "NonFiniteError",
    "Optimizer",
    "StepResult",
    "clip_grad_norm",
    "global_grad_norm",
    "make_optimizer",
]

ON_NONFINITE = ("raise", "skip")


class NonFiniteError(InputError):
    """A loss or gradient is NaN or infinite; the step was refused and nothing was changed."""


@dataclass(frozen=True)
class StepResult:
    """What ``Optimizer.step`` did.

    applied: whether the weights were updated; loss, grad_norm: host floats read in the step's one
    host transfer (grad_norm is the norm passed in, e.g. the pre-clipping norm, else the global norm
    of the gradients given); nonfinite: names of the non-finite gradients ("loss" for the loss), or,
    when those are all finite, "updated.<name>" for each parameter the update would overflow.
    """

    applied: bool
    loss: float | None
    grad_norm: float
    nonfinite: tuple[str, ...] = ()


def _writable(a: Any) -> bool:
    """False for a read-only NumPy array (CuPy arrays are always writable)."""
    flags = getattr(a, "flags", None)
    return bool(getattr(flags, "writeable", True))


class Optimizer:
    """Base class: holds the parameters (updated in place), the state arrays and the guard.

    ``params``: an RNN (its ``params`` and ``backend`` are used) or a mapping of arrays of
    ``backend``. Subclasses name their state slots in ``SLOTS`` and implement ``_update``.
    """

    name = "base"
    SLOTS: tuple[str, ...] = ()
    #: The slots that accumulate squares (never negative).
    SQUARES: tuple[str, ...] = ()

    def __init__(
        self,
        params: Any,
        *,
        lr: float,
        backend: str | Backend | None = None,
        on_nonfinite: str = "raise",
        weight_decay: float = 0.0,
    ) -> None:
        #: the model's ``constrain`` (a constrained cell's parameters back into their set, e.g. IndRNN's |w|
        #: bound) when built on a model: every applied step projects its new values with it before they land;
        #: None when built on a mapping. A callable set here with no required argument is called with none once a
        #: step is committed and counted, on the parameters themselves (``_takes_values``)
        self.constrain = None
        if hasattr(params, "params") and hasattr(params, "backend"):
            be = params.backend if backend is None else get_backend(backend)
            self.constrain = getattr(params, "constrain", None)
            params = params.params
        else:
            be = get_backend("numpy" if backend is None else backend)
        if not isinstance(params, Mapping) or not params:
            raise InputTypeError("params must be an RNN or a non-empty mapping of arrays")
        for k, p in params.items():
            be.check_native(p, f"parameter {k}")
            if not be.is_native(p):
                raise InputTypeError(f"parameter {k} must be an array of the {be.name} backend, got {type(p).__name__}")
            if not _writable(p):
                raise InputError(f"parameter {k} is a read-only array; the optimizer updates parameters in place")
        _check_unshared(params, be.xp)
        if on_nonfinite not in ON_NONFINITE:
            raise InputError(f"on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got {on_nonfinite!r}")
        self.backend = be
        self._unshared: tuple[Any, ...] = tuple(params.values())  # the arrays last found apart (again on a change)
        self.params = params
        self.lr = lr  # checked: the ``lr`` property
        #: the base rate of ``train``'s schedule where its config gives none: the rate built with, or the one
        #: ``lr`` held when a run began (set by hand); ``lr`` is what the next step uses (``train`` sets it).
        #: Both rates below travel in ``state_dict``, so a loaded optimizer tells the same base as the saved one
        self.base_lr = self.lr
        #: the rate ``train`` last set (None: never): an ``lr`` still equal to it was left by a schedule, not chosen
        self.scheduled_lr: float | None = None
        self.on_nonfinite = on_nonfinite
        self.weight_decay = _check_decay(weight_decay)
        self.t = 0  # number of applied steps (host int: no sync)
        xp = be.xp
        self.state = {slot: {k: xp.zeros_like(p) for k, p in params.items()} for slot in self.SLOTS}
        # a step writes the new parameters into _scratch and the new state into _next, and only
        # copies / swaps them in once the guard has seen them finite: a refused step changes nothing
        self._scratch = {k: xp.empty_like(p) for k, p in params.items()}
        self._next = {slot: {k: xp.empty_like(p) for k, p in params.items()} for slot in self.SLOTS}

    @property
    def lr(self) -> float:
        """The rate the next step uses: a number in (0, ``LR_MAX``], checked whenever it is set (by hand, by ``train``'s
        schedule, by ``load_state_dict``): InputTypeError / InputError, and the rate stays as it was."""
        return self._lr

    @lr.setter
    def lr(self, value: Any) -> None:
        self._lr = _check_lr(value)

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({hyper}, t={self.t}, backend={self.backend.name!r})"

    # -- copies: copy.deepcopy and pickle --------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """What ``pickle`` and ``copy.deepcopy`` keep: the settings, the step count and the state as host NumPy
        arrays, the backend by name; the scratch buffers are made anew. Built on a model (its ``constrain`` is
        bound to it), the parameters are the model's: copied together (``copy.deepcopy((model, opt))``, one
        pickle of both), the copy steps the copied model; copied alone, it brings a copy of the model along."""
        be, model = self.backend, getattr(self.constrain, "__self__", None)
        skip = ("backend", "params", "state", "_scratch", "_next", "_constrain_kind", "_unshared")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state["backend"] = be.name
        host = {slot: {k: np.array(be.to_numpy(a)) for k, a in arrays.items()} for slot, arrays in self.state.items()}
        state["state"] = host
        owned = model is not None and self.params is getattr(model, "params", None)
        state["params"] = None if owned else {k: np.array(be.to_numpy(p)) for k, p in self.params.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        name, params, slots = state.pop("backend"), state.pop("params"), state.pop("state")
        if "lr" in state:  # a state kept before the rate was a checked property (stored as "_lr")
            state["_lr"] = _check_lr(state.pop("lr"))
        self.__dict__.update(state)
        self._unshared = ()  # checked again at the first step
        if params is None:  # the model's own parameters (the model travels in ``constrain``)
            model = self.constrain.__self__
            be, params = model.backend, model.params
        else:
            be = get_backend(name)
            params = {k: be.asarray(p) for k, p in params.items()}
        self.backend, self.params, xp = be, params, be.xp
        self.state = {
            slot: {k: be.asarray(a, dtype=params[k].dtype) for k, a in arrays.items()} for slot, arrays in slots.items()
        }
        self._scratch = {k: xp.empty_like(p) for k, p in params.items()}
        self._next = {slot: {k: xp.empty_like(p) for k, p in params.items()} for slot in self.SLOTS}

    def hyperparameters(self) -> dict[str, Any]:
        """The settings needed to rebuild this optimizer (JSON-serialisable); weight_decay only when not 0."""
        decay = {"weight_decay": self.weight_decay} if self.weight_decay else {}  # files without it: 0
        return {"lr": self.lr, "on_nonfinite": self.on_nonfinite, **decay}

    # -- the guard ----------------------------------------------------------------------------
    def _read_back(self, pairs: list[tuple[str, Any]], loss: Any, norm: Any) -> np.ndarray:
        """[Σg_k² for each k, total, loss, norm, whether each updated parameter and its new optimizer state are
        finite (1/0)] in ONE device-to-host transfer (the step's sync point)."""
        xp = self.backend.xp
        sq = xp.stack([xp.vdot(g.ravel(), g.ravel()).astype(xp.float64) for _, g in pairs])
        extra = [sq.sum()]
        extra.append(xp.asarray(np.nan if loss is None else loss, dtype=xp.float64).reshape(()))
        extra.append(xp.asarray(np.nan if norm is None else norm, dtype=xp.float64).reshape(()))
        finite = []  # each updated parameter AND its new optimizer state: a step never commits an overflow
        for k, _ in pairs:
            ok = xp.isfinite(self._scratch[k]).all()
            for slot in self.SLOTS:
                ok = ok & xp.isfinite(self._next[slot][k]).all()
            finite.append(ok.astype(xp.float64))
        return self.backend.to_numpy(xp.concatenate([sq, xp.stack(extra), xp.stack(finite)]))

    def _why(self, pairs: list[tuple[str, Any]], names: list[str]) -> str:
        # Failure path only: find out whether the array holds NaN/inf or only its norm overflows.
        xp = self.backend.xp
        parts = []
        g = dict(pairs)
        for k in names:
            if k == "loss":
                parts.append("the loss")
            elif k == "norm":
                parts.append("the global gradient norm")
            elif bool(self.backend.to_numpy(xp.isfinite(g[k]).all())):
                parts.append(f"{k} (finite entries, but its norm overflows {g[k].dtype})")
            else:
                parts.append(f"{k} (contains NaN or infinity)")
        return ", ".join(parts)

    # -- the update ---------------------------------------------------------------------------
    def step(
        self, grads: Mapping[str, Any], *, loss: Any = None, grad_norm: Any = None, step: int | None = None
    ) -> StepResult:
        """Update every parameter IN PLACE from ``grads`` (same keys and shapes; "s0" is ignored).

        loss: the 0-d loss (checked and read back); grad_norm: a 0-d norm to report instead of the
        global norm of ``grads`` (pass ``clip_grad_norm``'s return for the pre-clipping norm);
        step: the step number for error messages (default: applied steps + 1). One host transfer.
        Raises NonFiniteError (nothing changed) on a non-finite loss or gradient, or when the update
        would overflow a parameter, unless ``on_nonfinite="skip"``, which returns a result with
        ``applied=False``. All or nothing: if anything fails, no parameter, state or step count changes (but for a
        caller's own ``constrain``, run once the step is committed and counted: should it fail, the step stays).
        """
        pairs = _param_grads(self.params, grads)
        _check_scalar(loss, "loss")
        _check_scalar(grad_norm, "grad_norm")
        for k, g in pairs:
            self.backend.check_native(g, f"gradient {k}")
            if not self.backend.is_native(g):
                raise InputTypeError(f"gradient {k} must be an array of the {self.backend.name} backend")
        _check_real(pairs)
        arrays = tuple(self.params.values())
        if len(arrays) != len(self._unshared) or any(a is not b for a, b in zip(arrays, self._unshared, strict=False)):
            _check_unshared(self.params, self.backend.xp)  # an array assigned since: apart from the rest?
            self._unshared = arrays
        for k, p in self.params.items():
            if not _writable(p):
                raise InputError(f"parameter {k} is a read-only array; the optimizer updates parameters in place")
            if k not in self._scratch or tuple(self._scratch[k].shape) != tuple(p.shape):
                raise InputError(f"parameter {k} is not the one this optimizer was built on")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # overflows are the guard's to report
            for k, g in pairs:  # the new values go to _scratch and _next only
                self._update(k, self.params[k], g)
                if self.weight_decay:  # decoupled weight decay (AdamW): θ − lr·λ·θ − lr·update
                    self._scratch[k] -= (self.lr * self.weight_decay) * self.params[k]
        host = self._read_back(pairs, loss, grad_norm)
        P = len(pairs)
        bad = [k for (k, _), v in zip(pairs, host[:P], strict=True) if not np.isfinite(v)]
        loss_f = None if loss is None else float(host[P + 1])
        if loss is not None and not np.isfinite(loss_f):
            bad.append("loss")
        if not bad and not np.isfinite(host[P]):
            bad.append("norm")  # every part finite, their sum overflows
        norm_f = float(np.sqrt(host[P])) if grad_norm is None else float(host[P + 2])
        if bad:
            n = self.t + 1 if step is None else step
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {n}: non-finite {self._why(pairs, bad)}; loss = {loss_f}. The step was refused and "
                    "the weights were not changed: lower the learning rate, clip the gradients (max_norm), "
                    "or skip such steps (on_nonfinite='skip')"
                )
            return StepResult(applied=False, loss=loss_f, grad_norm=norm_f, nonfinite=tuple(bad))
        overflow = [k for (k, _), ok in zip(pairs, host[P + 3 :], strict=True) if not ok]
        if overflow:
            n = self.t + 1 if step is None else step
            if self.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"step {n}: the update would overflow parameter{'s' if len(overflow) > 1 else ''} "
                    f"{', '.join(overflow)} (or {'their' if len(overflow) > 1 else 'its'} optimizer state) to NaN or "
                    f"infinity (loss = {loss_f} and the gradients are finite; "
                    f"lr = {self.lr:g}). The step was refused and the weights were not changed: lower the "
                    "learning rate, clip the gradients (max_norm), or skip such steps (on_nonfinite='skip')"
                )
            bad = [f"updated.{k}" for k in overflow]
            return StepResult(applied=False, loss=loss_f, grad_norm=norm_f, nonfinite=tuple(bad))
        on_values = self.constrain is not None and self._constrain_takes_values()
        if on_values:  # the cell's constraint set, on the new values before they land (a failing projection changes
            self.constrain({k: self._scratch[k] for k, _ in pairs})  # nothing); in place, no sync
        # commit: nothing below can fail (shapes, dtypes and writability were checked above) and a Ctrl-C waits for
        # its end: every parameter, the state and the step count, or none. Under the model's call lock where the
        # optimizer knows the model (its ``constrain``): a copy or a call of the model in another thread sees its
        # parameters before or after the step, never half-way (copies had been torn)
        model = getattr(self.constrain, "__self__", None)
        with sigint_deferred(), getattr(model, "_lock", None) or contextlib.nullcontext():
            for k, _ in pairs:
                self.params[k][...] = self._scratch[k]
            for slot in self.SLOTS:
                self.state[slot], self._next[slot] = self._next[slot], self.state[slot]
            self.t += 1
            if self.constrain is not None and not on_values:  # a caller's own projection of the parameters, once
                self.constrain()  # the step is whole and counted: should it fail, the step stays applied and counted
        return StepResult(applied=True, loss=loss_f, grad_norm=norm_f)

    def _constrain_takes_values(self) -> bool:
        """``_takes_values(self.constrain)``, read once per callable set (a signature costs ~14 µs a step)."""
        known = self.__dict__.get("_constrain_kind")
        if known is None or known[0] is not self.constrain:
            known = self.__dict__["_constrain_kind"] = (self.constrain, _takes_values(self.constrain))
        return known[1]

    def _update(self, k: str, p: Any, g: Any) -> None:
        """Write θ's new value into ``self._scratch[k]`` and each slot's new state into ``self._next[slot][k]``,
        reading the step number as ``self.t + 1``; never write ``p`` or ``self.state``."""
        raise NotImplementedError

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Flat state, a snapshot that later steps leave as it is: "t" (0-d int64, host), "base_lr", "lr" (the next
        step's rate) and, once ``train`` has set a rate, "scheduled_lr" (0-d float64, host), and copies of the
        "<slot>.<param>" arrays on the backend."""
        out: dict[str, Any] = {
            "t": np.asarray(self.t, dtype=np.int64),
            "base_lr": np.asarray(self.base_lr, dtype=np.float64),
        }
        if self.scheduled_lr is not None:
            out["scheduled_lr"] = np.asarray(self.scheduled_lr, dtype=np.float64)
        out["lr"] = np.asarray(self.lr, dtype=np.float64)  # the next step's rate: one set by hand too
        for slot, arrays in self.state.items():
            for k, a in arrays.items():
                out[f"{slot}.{k}"] = a.copy()  # a step swaps the state buffers and writes the old ones
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output (NumPy or backend arrays); validated before anything changes.

        "base_lr", "scheduled_lr" and "lr" are optional: without "base_lr" (a state saved before it was kept) both
        rates stay as they are; with it, "scheduled_lr" absent means no rate was scheduled (None); "lr" (saved since
        the rate set by hand was kept) is the next step's rate, else the last scheduled one, else the base."""
        expected = {"t"} | {f"{slot}.{k}" for slot in self.SLOTS for k in self.params}
        optional = {"base_lr", "scheduled_lr", "lr"}
        if not expected <= set(state) <= expected | optional:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected - optional)
            raise InputError(f"{self.name} state does not match the parameters: missing {missing}, unexpected {extra}")
        t = np.asarray(self.backend.to_numpy(state["t"]))
        if t.shape != () or t.dtype.kind not in "iu" or int(t) < 0:
            raise InputError(f"optimizer state 't' must be a 0-d int ≥ 0, got {t!r}")
        if "scheduled_lr" in state and "base_lr" not in state:
            raise InputError("optimizer state 'scheduled_lr' is given without 'base_lr'; expected both or neither")
        rates = {}
        for name in optional & set(state):
            r = np.asarray(self.backend.to_numpy(state[name]))
            if r.shape != () or r.dtype.kind not in "fiu" or not (0 < r <= LR_MAX):  # NaN fails the comparison
                raise InputError(f"optimizer state {name!r} must be a 0-d rate in (0, {LR_MAX:g}], got {r!r}")
            rates[name] = float(r)
        new = {}
        for slot in self.SLOTS:
            for k, p in self.params.items():
                a = self.backend.to_numpy(state[f"{slot}.{k}"])
                if tuple(a.shape) != tuple(p.shape):
                    raise ShapeError(f"optimizer state {slot}.{k} has shape {a.shape}, expected {tuple(p.shape)}")
                if a.dtype.kind != "f":
                    raise InputError(f"optimizer state {slot}.{k} must be floats, got dtype {a.dtype}")
                with np.errstate(over="ignore"):
                    a = a.astype(self.params[k].dtype)  # finite where it will be used: in the parameter's dtype
                if not np.isfinite(a).all():
                    raise InputError(f"optimizer state {slot}.{k} is not finite in {a.dtype} (NaN, inf or too large)")
                if slot in self.SQUARES and (a < 0).any():
                    raise InputError(f"optimizer state {slot}.{k} accumulates squares, yet holds negative values")
                new[slot, k] = a
        for (slot, k), a in new.items():
            self.state[slot][k][...] = self.backend.asarray(a, dtype=self.params[k].dtype)
        self.t = int(t)
        if "base_lr" in rates:  # the base a run without TrainConfig.lr takes, as before the save (train), and the
            self.base_lr, self.scheduled_lr = rates["base_lr"], rates.get("scheduled_lr")  # rate the next step uses:
            self.lr = rates.get("scheduled_lr", rates["base_lr"])  # the last scheduled one, else the base
        if "lr" in rates:  # the rate the next step uses, as saved (one set by hand after the last schedule's)
            self.lr = rates["lr"]


class SGD(Optimizer):
    """Stochastic gradient descent with optional (heavy-ball) momentum: v ← μv + g, θ ← θ − lr·v."""

    name = "sgd"

    def __init__(self, params: Any, *, lr: float = 0.1, momentum: float = 0.0, **kw: Any) -> None:
        self.momentum = _check_unit(momentum, "momentum")
        self.SLOTS = ("momentum",) if self.momentum else ()
        super().__init__(params, lr=lr, **kw)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "momentum": self.momentum}

    def _update(self, k: str, p: Any, g: Any) -> None:
        xp, tmp = self.backend.xp, self._scratch[k]
        if self.momentum:
            v = self._next["momentum"][k]
            xp.multiply(self.state["momentum"][k], self.momentum, out=v)
            v += g  # v ← μ v + g
            g = v
        xp.multiply(g, self.lr, out=tmp)
        xp.subtract(p, tmp, out=tmp)  # θ ← θ − lr v


class Adagrad(Optimizer):
    """Adagrad as in min-char-rnn: G ← G + g², θ ← θ − lr·g/√(G + ε)."""

    name = "adagrad"
    SLOTS = ("sum_sq",)
    SQUARES = ("sum_sq",)

    def __init__(self, params: Any, *, lr: float = 0.1, eps: float = 1e-8, **kw: Any) -> None:
        eps = _check_eps(eps, self.name)
        super().__init__(params, lr=lr, **kw)
        self.eps = eps

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "eps": self.eps}

    def _update(self, k: str, p: Any, g: Any) -> None:
        xp, G, tmp = self.backend.xp, self._next["sum_sq"][k], self._scratch[k]
        xp.multiply(g, g, out=tmp)
        xp.add(self.state["sum_sq"][k], tmp, out=G)  # G ← G + g²
        xp.add(G, self.eps, out=tmp)
        xp.sqrt(tmp, out=tmp)
        xp.divide(g, tmp, out=tmp)
        tmp *= self.lr
        xp.subtract(p, tmp, out=tmp)  # θ ← θ − lr g / √(G + ε)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction: θ ← θ − lr·m̂/(√v̂ + ε)."""

    name = "adam"
    SLOTS = ("m", "v")
    SQUARES = ("v",)

    def __init__(
        self, params: Any, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **kw: Any
    ) -> None:
        eps = _check_eps(eps, self.name)
        beta1, beta2 = _check_betas(betas)
        super().__init__(params, lr=lr, **kw)
        self.beta1, self.beta2 = beta1, beta2
        self.eps = eps

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "betas": [self.beta1, self.beta2], "eps": self.eps}

    def _update(self, k: str, p: Any, g: Any) -> None:
        xp, m, v, tmp = self.backend.xp, self._next["m"][k], self._next["v"][k], self._scratch[k]
        b1, b2 = self.beta1, self.beta2
        xp.multiply(self.state["m"][k], b1, out=m)
        xp.multiply(g, 1 - b1, out=tmp)
        m += tmp  # m ← β₁m + (1−β₁)g
        xp.multiply(self.state["v"][k], b2, out=v)
        xp.multiply(g, g, out=tmp)
        tmp *= 1 - b2
        v += tmp  # v ← β₂v + (1−β₂)g²
        # θ ← θ − lr m̂/(√v̂ + ε) with m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ); the corrections are host floats
        t = self.t + 1  # this step's number: t advances only once the step is applied
        c1, c2 = 1 - b1**t, 1 - b2**t
        xp.divide(v, c2, out=tmp)
        xp.sqrt(tmp, out=tmp)
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= self.lr / c1
        xp.subtract(p, tmp, out=tmp)


OPTIMIZERS = {"sgd": SGD, "adagrad": Adagrad, "adam": Adam}
DEFAULT_LR = {"sgd": 0.1, "adagrad": 0.1, "adam": 3e-3}


#: the settings each optimizer takes beside ``lr``, ``backend``, ``on_nonfinite`` and ``weight_decay``
SETTINGS = {"sgd": ("momentum",), "adagrad": ("eps",), "adam": ("betas", "eps")}
COMMON_SETTINGS = ("lr", "backend", "on_nonfinite", "weight_decay")


def make_optimizer(name: str, params: Any, **kw: Any) -> Optimizer:
    """Build an optimizer by name ("sgd", "adagrad", "adam"); ``lr`` defaults per optimizer.

    A setting the optimizer does not take is refused (InputError) naming it, except ``momentum`` of 0 or None
    beside Adagrad or Adam (what a caller passing one set of settings to every optimizer gives)."""
    if not isinstance(name, str) or name not in OPTIMIZERS:  # a list would fail the lookup unhashable
        raise InputError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    kw.setdefault("lr", DEFAULT_LR[name])
    if name != "sgd" and "momentum" in kw:
        m = kw.pop("momentum")
        if not (m is None or (isinstance(m, NUMBER) and not isinstance(m, bool) and m == 0)):
            raise InputError(
                f"momentum={m!r} applies to sgd only; {name} keeps its own statistics of the gradients "
                "(give momentum=0 or None, or leave it out)"
            )
    takes = (*COMMON_SETTINGS, *SETTINGS[name])
    unknown = [k for k in kw if k not in takes]
    if unknown:
        raise InputError(
            f"{name} takes no setting {', '.join(map(repr, unknown))}; its settings are {', '.join(takes)}"
        )
    return OPTIMIZERS[name](params, **kw)
