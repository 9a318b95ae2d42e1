"""Data-parallel training: each rank runs forward+BPTT on its share of the B streams, one allreduce per step.

    rank r holds streams [lo_r, hi_r) of the global batch (the first B mod N ranks one more)
    E_r, g_r  = loss_and_grads(x[:, lo:hi], ..., reduction="sum")        local sums
    [g, E, n] = allreduce([g_r..., E_r, n_r])                              ONE flat buffer, one collective
    g, E      = g / n, E / n                                               mean over the global token count
    then clip, the non-finite guard and the optimizer, identically on every rank

``DataParallel`` wraps a model the way ``torch.nn.parallel.DistributedDataParallel`` does: the
training loop (``gpubptt.training.loop.train``) sees a model whose ``loss_and_grads`` returns the global
mean, so the loop itself is unchanged. Every rank starts from rank 0's parameters (a broadcast);
every ``check_every`` steps a checksum of the parameters is compared across ranks, and a rank whose
weights drifted stops the run (RuntimeError naming the ranks). A rank's carried state has its
streams only; ``global_state`` gathers all B streams in the global order (for a checkpoint) and
``local_state`` cuts a global state into this rank's share, so a run saved by N ranks resumes
under any M ≤ B.

The carried state's batch axis is axis −2: (B, H) for one layer, (layers·directions, B, H) for a
stack, both handled the same way.

Overlap: the gradient buffer is packed once ``loss_and_grads`` has returned; dV and dc are final
before the backward recurrence starts, but starting their allreduce early needs a hook inside the
engine's backward pass, which this module does not have. benchmarks/README.md has the measured
share of a step that the allreduce takes, which bounds what the overlap could save.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..dropout import draw_undone_on_failure, mask_key
from ..errors import InputError, InputTypeError
from ..heads import mean_count
from ..training.loop import TrainConfig, TrainState, evaluate
from ..validation import NOTHING_COUNTED, check_positive_int
from .base import Communicator, allgather_text

__all__ = ["DataParallel", "ParameterDivergenceError", "ShardedData", "shard_range"]


class ParameterDivergenceError(RuntimeError):
    """The ranks' parameters are no longer identical (the checksum differs)."""


def shard_range(B: int, size: int, rank: int, *, what: str = "the batch") -> tuple[int, int]:
    """Streams [lo, hi) of ``rank`` among ``size`` ranks: ⌊B/N⌋ each, the first B mod N ranks one more.

    InputError when there are more ranks than streams (a rank with no stream would train nothing), and for a
    size below 1 or a rank outside [0, size).
    """
    B = check_positive_int(B, "B (the global batch)")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"size must be an int ≥ 1 (the number of ranks), got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise InputError(f"rank must be an int in [0, {size}) (one of the {size} ranks), got {rank!r}")
    if size > B:
        raise InputError(
            f"{size} ranks need at least {size} streams, but {what} has B={B}: use --batch ≥ {size} "
            f"or at most {B} ranks"
        )
    q, r = divmod(B, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def _eval_range(B: int, size: int, rank: int) -> tuple[int, int]:
    """As shard_range, but a rank may get no stream (a held-out batch smaller than the rank count)."""
    q, r = divmod(B, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (rank < r)


def _forward(wrapper: Any, inner: str, name: str) -> Any:
    """``wrapper.name`` read from the object it wraps (``wrapper.<inner>``); AttributeError for a special name or
    before the wrapped object is set (``copy`` and ``pickle`` probe a bare instance: no endless recursion)."""
    if name.startswith("__") or inner not in wrapper.__dict__:
        raise AttributeError(name)
    return getattr(wrapper.__dict__[inner], name)


def _forward_set(wrapper: Any, inner: str, own: frozenset[str], name: str, value: Any) -> None:
    """``wrapper.name = value`` (``del wrapper.name`` for ``_DELETE``): the wrapper's own fields (``own``) and what
    its class defines are its; any other name is the wrapped object's (as reads are: ``_forward``), so a setting made
    on the wrapper reaches what it wraps (and ``mock.patch`` on the wrapper undoes it there)."""
    target = wrapper if name in own or hasattr(type(wrapper), name) or inner not in wrapper.__dict__ else None
    if value is _DELETE:
        object.__delattr__(wrapper, name) if target is wrapper else delattr(wrapper.__dict__[inner], name)
    elif target is wrapper:
        object.__setattr__(wrapper, name, value)
    else:
        setattr(wrapper.__dict__[inner], name, value)


_DELETE = object()  # ``_forward_set``'s value for a ``del``
#: the fields DataParallel and ShardedData keep on themselves (every other name is the wrapped object's)
_PARALLEL_OWN = frozenset({"model", "comm", "batch_size", "check_every", "calls", "lo", "hi"})
_SHARDED_OWN = frozenset({"data", "global_batch", "lo", "hi", "comm"})


def _check_comm(comm: Any) -> None:
    """InputTypeError unless ``comm`` is a Communicator, or an object with what the wrappers use of one."""
    missing = [a for a in ("rank", "size", "allreduce", "broadcast") if not hasattr(comm, a)]
    if missing:
        raise InputTypeError(
            f"comm must be a Communicator (gpubptt.distributed.make_communicator, LocalCommunicator), got "
            f"{type(comm).__name__} {comm!r}, which has no {', '.join(missing)}"
        )


def _uncopyable(wrapper: Any, inner: str) -> InputTypeError:
    """The refusal of ``copy``, ``copy.deepcopy`` and ``pickle`` for a wrapper that holds a communicator."""
    kind = type(wrapper).__name__
    return InputTypeError(
        f"a {kind} cannot be copied or pickled: it holds its ranks' communicator, which is this process's; copy or "
        f"pickle what it wraps (its .{inner}) and wrap the copy anew"
    )


class ShardedData:
    """This rank's columns of a data set's batches: ``train_sequence`` (L, hi−lo), held-out batches split too.

    Every rank draws the global batch (the same for the same seed) and keeps its streams, so the
    streams are the ones one process would train on, whatever the rank count. Everything else
    (sizes, kind, chance level, spec) is the wrapped data set's.
    """

    def __init__(self, data: Any, *, batch_size: int, lo: int, hi: int, comm: Communicator) -> None:
        _check_comm(comm)
        batch_size = check_positive_int(batch_size, "batch_size")
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi))
        if not ok or not 0 <= lo < hi <= batch_size:
            raise InputError(
                f"lo, hi must be ints with 0 ≤ lo < hi ≤ batch_size={batch_size}, got lo={lo!r}, hi={hi!r}"
            )
        self.data, self.global_batch, self.lo, self.hi, self.comm = data, batch_size, int(lo), int(hi), comm

    def __getattr__(self, name: str) -> Any:
        return _forward(self, "data", name)

    def __setattr__(self, name: str, value: Any) -> None:
        _forward_set(self, "data", _SHARDED_OWN, name, value)

    def __delattr__(self, name: str) -> None:
        _forward_set(self, "data", _SHARDED_OWN, name, _DELETE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise _uncopyable(self, "data")

    def __repr__(self) -> str:
        return f"ShardedData({self.data!r}, streams [{self.lo}, {self.hi}) of {self.global_batch})"

    def check_batch(self, batch_size: int, chunk: int) -> None:
        """The wrapped data's check, for the global batch."""
        self.data.check_batch(self.global_batch, chunk)

    def train_sequence(self, i: int, *, seed: int, batch_size: int, chunk: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """This rank's streams of batch i: x, y (L, hi − lo) int64."""
        if batch_size != self.hi - self.lo:
            raise InputError(
                f"rank {self.comm.rank} holds {self.hi - self.lo} streams, but the loop asked for {batch_size}"
            )
        x, y = self.data.train_sequence(i, seed=seed, batch_size=self.global_batch, chunk=chunk)
        return np.ascontiguousarray(x[:, self.lo : self.hi]), np.ascontiguousarray(y[:, self.lo : self.hi])

    def eval_sequences(self, **kwargs: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """This rank's streams of each held-out batch (none when a batch has fewer streams than ranks)."""
        out = []
        for x, y in self.data.eval_sequences(**kwargs):
            lo, hi = _eval_range(x.shape[1], self.comm.size, self.comm.rank)
            if hi > lo:
                out.append((np.ascontiguousarray(x[:, lo:hi]), np.ascontiguousarray(y[:, lo:hi])))
        return out


def _differences(ours: str, theirs: str, width: int = 60) -> str:
    """What differs between two fingerprints ("|"-separated "name=value" fields): "name: A (rank 0) against B"."""

    def fields(text: str) -> dict[str, str]:
        return dict(f.split("=", 1) if "=" in f else (f, "") for f in text.split("|"))

    def short(v: str | None) -> str:
        return "none" if v is None else v if len(v) <= width else v[: width - 1] + "…"

    a, b = fields(ours), fields(theirs)
    names = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {short(b.get(k))} against rank 0's {short(a.get(k))}" for k in names) or "(unreadable)"


def _digest(text: str) -> float:
    """48 bits of sha256(text) as a float64 (exact: below 2^53), to compare across ranks in one allreduce."""
    return float(int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big"))


class DataParallel:
    """``model`` trained on this rank's share of a global batch of ``batch_size`` streams; see the module docstring.

    Construction is collective (every rank must make one): it refuses more ranks than streams,
    compares ``fingerprint`` (the options and versions the caller ran with) across ranks, and
    broadcasts rank 0's parameters. Attributes not defined here are the model's (``params``,
    ``backend``, ``forward``...), read and set, so the training loop and the optimizer use it as the model.
    """

    def __init__(
        self,
        model: Any,
        comm: Communicator,
        *,
        batch_size: int,
        fingerprint: str = "",
        check_every: int = 100,
    ) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, (int, np.integer)) or check_every < 0:
            raise InputError(f"check_every must be an int ≥ 0 (0: never), got {check_every!r}")
        _check_comm(comm)
        batch_size = check_positive_int(batch_size, "batch_size")
        self.model, self.comm, self.batch_size, self.check_every = model, comm, batch_size, int(check_every)
        self.calls = 0
        from .. import __version__

        shapes = ";".join(f"{k}{tuple(p.shape)}" for k, p in model.params.items())
        self._agree(f"gpubptt={__version__}|dtype={model.dtype}|shapes={shapes}|B={batch_size}|{fingerprint}")
        self.lo, self.hi = shard_range(self.batch_size, comm.size, comm.rank)  # agreed B: every rank or none refuses
        self._broadcast_params()

    def __getattr__(self, name: str) -> Any:
        return _forward(self, "model", name)

    def __setattr__(self, name: str, value: Any) -> None:
        _forward_set(self, "model", _PARALLEL_OWN, name, value)

    def __delattr__(self, name: str) -> None:
        _forward_set(self, "model", _PARALLEL_OWN, name, _DELETE)

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise _uncopyable(self, "model")

    def __repr__(self) -> str:
        return f"DataParallel({self.model!r}, {self.comm!r}, streams [{self.lo}, {self.hi}) of {self.batch_size})"

    @property
    def local_batch(self) -> int:
        """This rank's streams, hi − lo."""
        return self.hi - self.lo

    # -- what every rank must agree on ------------------------------------------------------------
    def _gather_scalars(self, values: list[float]) -> np.ndarray:
        """(size, len(values)) float64: every rank's values (an allgather written as one allreduce)."""
        buf = np.zeros(self.comm.size * len(values))
        buf[self.comm.rank * len(values) : (self.comm.rank + 1) * len(values)] = values
        self.comm.allreduce(buf)
        return buf.reshape(self.comm.size, len(values))

    def _agree(self, fingerprint: str) -> None:
        got = self._gather_scalars([_digest(fingerprint)])[:, 0]
        differ = [r for r in range(self.comm.size) if got[r] != got[0]]
        if differ:  # every rank is here (they all see the same digests): exchange the texts to name what differs
            texts = allgather_text(self.comm, fingerprint)
            raise InputError(
                f"ranks {differ} were started with options or a gpubptt version different from rank 0's ("
                + "; ".join(f"rank {r}: {_differences(texts[0], texts[r])}" for r in differ)
                + "); start every rank with the same command"
            )

    def _flat_params(self) -> Any:
        xp = self.model.backend.xp
        return xp.concatenate([p.ravel() for p in self.model.params.values()])

    def _broadcast_params(self) -> None:
        flat = self._flat_params()
        self.comm.broadcast(flat, root=0)
        off = 0
        for p in self.model.params.values():
            n = p.size
            p[...] = flat[off : off + n].reshape(p.shape)  # in place: the optimizer holds these arrays
            off += n

    def check_parameters(self) -> None:
        """ParameterDivergenceError unless every rank holds the same parameters (by checksum; one host sync)."""
        xp, be = self.model.backend.xp, self.model.backend
        flat = self._flat_params().astype(xp.float64)
        ramp = xp.arange(1, flat.size + 1, dtype=xp.float64) / flat.size  # position-weighted: catches swaps
        local = be.to_numpy(xp.stack([flat.sum(), (flat * ramp).sum()])).tolist()
        got = self._gather_scalars(local)
        differ = [r for r in range(self.comm.size) if not np.array_equal(got[r], got[0])]
        if differ:
            raise ParameterDivergenceError(
                f"after {self.calls} steps the parameters of ranks {differ} differ from rank 0's "
                f"(checksums {got.tolist()}): the ranks no longer train one model"
            )

    def _shared_dropout_key(self) -> int:
        """The key of this call's masks drawn from rank 0's model generator, as one process draws it (collective).

        Every rank draws (so the generators stay in step) and takes rank 0's draw.
        """
        key = int(self.model.backend.to_numpy(mask_key(self.model._dropout_rng, be=self.model.backend))[0])
        halves = np.array([key >> 32, key & 0xFFFFFFFF], dtype=np.float64)  # exact in float64
        self.comm.broadcast(halves, root=0)
        return int(halves[0]) << 32 | int(halves[1])

    # -- the step ---------------------------------------------------------------------------------
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
        recompute: Any = None,
        max_memory: int | None = None,
    ) -> tuple[Any, dict[str, Any]] | tuple[Any, dict[str, Any], Any]:
        """The model's ``loss_and_grads`` on this rank's streams, summed (or averaged) over every rank.

        ``recompute``/``max_memory`` as the model's (each rank's budget for its own streams).
        With dropout, every mask entry is a hash of (``dropout_seed``, layer, step, global stream,
        unit): each rank draws its streams' masks as one process draws them for the same streams, so
        the run is the one process's whatever the rank count. Without ``dropout_seed`` the key comes
        from rank 0's model generator (one host sync and one broadcast per call).

        x (T, b) or (T, b, D), y (T, b), s0 (b, H), lengths (b,): this rank's b = hi − lo streams.
        Returns what the model returns: the loss and parameter gradients of the whole global batch
        (identical on every rank), grads["s0"] (b, H) for this rank's streams, and the final state
        (b, H) if asked. reduction="mean" divides by the global count of what the model's head sums over
        (counted steps for the per-step softmax; see ``gpubptt.heads``).
        """
        if reduction not in ("sum", "mean"):
            raise InputError(f"unknown reduction {reduction!r}; expected sum or mean")
        shape = tuple(getattr(x, "shape", ()))
        streams = shape[0 if self.model.batch_first else 1] if len(shape) >= 2 else self.local_batch
        if streams != self.local_batch:  # before any collective: every rank refuses or none
            raise InputError(
                f"x holds {streams} streams, but rank {self.comm.rank} trains its "
                f"{self.local_batch} of the global batch of {self.batch_size} (streams [{self.lo}, {self.hi})): give "
                "each rank its own (train() on dp.shard_data(data) with dp.local_config(config), or x[:, dp.lo:dp.hi])"
            )
        if self.check_every and self.calls and self.calls % self.check_every == 0:
            self.check_parameters()
        self.calls += 1
        budget = (("recompute", recompute), ("max_memory", max_memory))
        drop: dict[str, Any] = {k: v for k, v in budget if v is not None}
        # masks for the per-step softmax head only: another head refuses dropout itself, naming it
        m = self.model
        drawn = dropout_seed is None and m.dropout and m.num_layers > 1 and m.head == "softmax"
        # a failed call (refused, or a Ctrl-C, in the model's call or in the collective) draws no masks
        with draw_undone_on_failure(self.model._dropout_rng if drawn else None):
            if drawn:
                dropout_seed = self._shared_dropout_key()
            if dropout_seed is not None:
                drop.update(dropout_seed=dropout_seed, dropout_offset=self.lo)  # masks of the global streams lo…hi−1
            out = self.model.loss_and_grads(
                x, y, s0, lengths=lengths, truncate=truncate, reduction="sum", return_final_state=return_final_state,
                **drop,
            )  # fmt: skip
            return self._summed(out, x, lengths, reduction, return_final_state)

    def _summed(
        self, out: tuple[Any, ...], x: Any, lengths: Any, reduction: str, return_final_state: bool
    ) -> tuple[Any, dict[str, Any]] | tuple[Any, dict[str, Any], Any]:
        """This rank's (loss, grads[, final]) summed over every rank (one allreduce), scaled for "mean"."""
        loss, grads = out[0], out[1]
        be, xp = self.model.backend, self.model.backend.xp
        count = self._count(x, lengths)
        names = list(self.model.params)
        sizes = [grads[k].size for k in names]
        buf = xp.empty(sum(sizes) + 2, dtype=grads[names[0]].dtype)  # [every gradient..., loss, count]
        off = 0
        for k, n in zip(names, sizes, strict=True):
            buf[off : off + n] = grads[k].ravel()
            off += n
        buf[-2] = loss
        buf[-1] = count
        self.comm.allreduce(buf)  # THE collective of the step
        # nothing counted here: the global batch may have nothing either (then every rank is here, and refuses)
        if reduction == "mean" and count == 0 and float(be.to_numpy(buf[-1:])[0]) == 0:
            raise InputError(NOTHING_COUNTED.replace("every length", "every length of the global batch"))
        scale = 1.0 / buf[-1:] if reduction == "mean" else None  # (1,): stays on the device, no host sync
        off = 0
        for k, n in zip(names, sizes, strict=True):
            g = buf[off : off + n].reshape(grads[k].shape)
            grads[k] = g * scale if scale is not None else g.copy()
            off += n
        loss = (buf[-2:-1] * scale if scale is not None else buf[-2:-1].copy()).reshape(())
        for k in {"s0", getattr(self.model.cell, "extra_state", None) or "s0"}:  # an LSTM's "c0" too
            if scale is not None and k in grads:  # this rank's streams only: scaled, not summed
                grads[k] = grads[k] * scale.astype(grads[k].dtype)
        if return_final_state:
            return loss, grads, out[2]
        return loss, grads

    def _count(self, x: Any, lengths: Any) -> float:
        """What this rank's share of the loss sums over, as ``gpubptt.heads`` says "mean" divides by it: counted
        steps (per-step softmax), × K (mse), sequences (last_softmax), × K (last_mse); x in the model's layout
        (``batch_first``: (b, T, …))."""
        model = self.model
        T, b = (int(x.shape[1]), int(x.shape[0])) if model.batch_first else (int(x.shape[0]), int(x.shape[1]))
        counted = b * T if lengths is None else int(np.minimum(model.backend.to_numpy(lengths), T).sum())
        return float(mean_count(model.head, b, counted, model.output_size))

    # -- data, state and evaluation of this rank ----------------------------------------------------
    def shard_data(self, data: Any) -> ShardedData:
        """``data`` cut to this rank's streams (see ShardedData)."""
        return ShardedData(data, batch_size=self.batch_size, lo=self.lo, hi=self.hi, comm=self.comm)

    def local_config(self, config: TrainConfig) -> TrainConfig:
        """``config`` with this rank's batch size (the global one must be the wrapper's)."""
        if config.batch_size != self.batch_size:
            raise InputError(f"config.batch_size is {config.batch_size}, but this run splits B={self.batch_size}")
        return replace(config, batch_size=self.local_batch)

    def local_state(self, state: TrainState) -> TrainState:
        """A copy of ``state`` whose carried s (..., B, H) is cut to this rank's streams (..., hi − lo, H);
        an LSTM's carried (h, c) element by element."""

        def cut(s: Any) -> Any:
            if s.ndim < 2 or s.shape[-2] != self.batch_size:
                raise InputError(
                    f"carried state has shape {tuple(s.shape)}, expected (..., B, H) with B={self.batch_size}"
                )
            return self.model.backend.asarray(s, dtype=self.model.dtype)[..., self.lo : self.hi, :].copy()

        s = state.s
        if s is not None:
            s = tuple(cut(a) for a in s) if isinstance(s, tuple) else cut(s)
        return replace(state, s=s)

    def global_state(self, state: TrainState) -> TrainState:
        """A copy of this rank's ``state`` with the carried s of all B streams, in order (collective).

        Every rank must call it at the same step; each writes its rows into zeros and one allreduce
        adds them (sums with zeros are exact).
        """
        if state.s is None:
            return replace(state)
        xp = self.model.backend.xp

        def gather(s: Any) -> Any:
            full = xp.zeros((*s.shape[:-2], self.batch_size, s.shape[-1]), dtype=s.dtype)
            full[..., self.lo : self.hi, :] = s
            self.comm.allreduce(full.reshape(-1))  # contiguous: the reshape is a view, filled in place
            return full

        s = state.s
        return replace(state, s=tuple(gather(a) for a in s) if isinstance(s, tuple) else gather(s))

    def evaluate(self, model: Any, data: Any, **kwargs: Any) -> dict[str, float]:
        """``gpubptt.training.loop.evaluate`` on this rank's held-out streams, the sums added over every rank."""
        return evaluate(model, data, reduce=self.comm.allreduce, **kwargs)


def describe_split(batch_size: int, size: int) -> Mapping[int, tuple[int, int]]:
    """{rank: (lo, hi)} for every rank: how B streams split over ``size`` ranks."""
    return {r: shard_range(batch_size, size, r) for r in range(size)}
