"""Benchmarks: how forward+BPTT cost grows with sequence length T and hidden size H.

Two sweeps per backend: T at a fixed H, and H at a fixed T. Every configuration is timed honestly
(warm-up runs first, each timed run synchronised with the device, data built once from a fixed seed
outside the timed region) and reported as median (the headline), min, IQR and the raw times.

A timing whose spread IQR/median exceeds NOISY_SPREAD (10 %) is flagged ``noisy``: its median is not a
reliable figure, and neither is an exponent fitted through it (each fit counts its noisy points).

FLOP model (multiply-adds count 2; elementwise work — tanh, exp, the gather and scatter-add of
token inputs — is not counted). With N = T·B rows:

    forward       input projection  (N, D)×(D, H)        2·N·D·H      (0 for one-hot tokens: a gather)
                  recurrence        T × (B, H)×(H, H)    2·N·H²
                  logits            (N, H)×(H, K)        2·N·H·K
    backward      ∂E/∂s = do @ V    (N, K)×(K, H)        2·N·H·K
                  dV = doᵀ s        (K, N)×(N, H)        2·N·H·K
                  δ_{t+1} @ W       T × (B, H)×(H, H)    2·N·H²
                  dW = δᵀ s         (H, N)×(N, H)        2·N·H²
                  dU = δᵀ x         (H, N)×(N, D)        2·N·H·D      (0 for tokens: a scatter-add)

    forward+BPTT  dense: 2·B·H·T·(2D + 3H + 3K)      tokens: 6·B·H·T·(H + K)
    forward       dense: 2·B·H·T·(D + H + K)         tokens: 2·B·H·T·(H + K)

Efficiency is measured against the GEMM rate of the same shapes, in the same run, on the same
backend and dtype: the two sequential products (4·B·H²·T FLOPs) are charged at the rate of T
back-to-back (B, H)×(H, H) GEMMs, everything else at the rate of one (T·B, H)×(H, K) GEMM (the
output layer as one product). ``gemm_gflops`` is the FLOP-weighted harmonic mean of the two, i.e.
the rate a perfect implementation would reach if every FLOP ran at the speed of a GEMM of its own
shape; ``efficiency = gflops / gemm_gflops``.

    >>> cfg = BenchConfig(backends=["numpy"], seq_lens=[4, 8], hidden_sizes=[8, 16], batch=2,
    ...                   D=5, K=5, warmup=0, repeats=1)
    >>> result = run_bench(cfg)
    >>> result["schema"], len(result["rows"])
    ('gpubptt.bench/1', 4)

Schema ``gpubptt.bench/1``; fields added since it was first written, without a new tag (readers of older
results see them missing): ``spread`` in each timing summary, ``noisy`` in each row and reference,
``noisy_points`` in each fit, ``noisy_spread`` (the threshold) in the result.

Nothing here prints: the command line (cli.py) renders the result.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import io
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from ._io import write_atomic
from .backend import Backend, get_backend, to_numpy
from .model import RNN

__all__ = [
    "COMPARES",
    "INPUTS",
    "NOISY_SPREAD",
    "SCHEMA",
    "BenchConfig",
    "Timer",
    "environment",
    "fit_exponent",
    "flops",
    "is_noisy",
    "make_timer",
    "naive_loss_and_grads",
    "plot_results",
    "render_csv",
    "run_bench",
    "summarize",
    "sync_timer",
    "time_fn",
    "time_interleaved",
    "torch_unavailable_reason",
    "write_atomic",
]

SCHEMA = "gpubptt.bench/1"
INPUTS = ("tokens", "dense")
COMPARES = ("none", "torch", "naive")
TORCH_HINT = "install PyTorch with `pip install torch` (a CPU build is enough for the CPU comparison)"
PLOT_HINT = "install matplotlib with `pip install 'gpubptt[plot]'`"
#: The naive reference times this many examples of the batch and scales by B / that (each example
#: costs the same, independently), with at most NAIVE_REPEATS timed runs, so a default run stays short.
NAIVE_EXAMPLES = 4
NAIVE_REPEATS = 3
#: Gradient agreement threshold (normwise max relative error) of a reference implementation, by dtype.
GRAD_TOL = {"float32": 1e-3, "float64": 1e-9}
#: A timing whose IQR / median exceeds this is flagged noisy: runs that far apart make the median unreliable.
NOISY_SPREAD = 0.1

#: A function that runs fn() once and returns its wall time in seconds, synchronised with the device.
Timer = Callable[[Callable[[], Any]], float]


# -- timing ---------------------------------------------------------------------------------------
def sync_timer(synchronize: Callable[[], None]) -> Timer:
    """A Timer built on a device sync and ``time.perf_counter``: sync, start, fn(), sync, stop.

    Syncing before starting keeps earlier queued work out of the measurement; syncing after makes the
    time include all the device work fn() queued (launches return before the kernels finish).
    """

    def run(fn: Callable[[], Any]) -> float:
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - t0

    return run


def make_timer(be: Backend) -> Timer:
    """The Timer for backend ``be``: CUDA events on CuPy, the host clock on NumPy."""
    return be.timer()


def time_fn(fn: Callable[[], Any], *, timer: Timer, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Run fn ``warmup`` times untimed, then ``repeats`` timed runs; returns the times in seconds."""
    for _ in range(warmup):
        timer(fn)
    return [timer(fn) for _ in range(repeats)]


def time_interleaved(
    fns: dict[str, tuple[Callable[[], Any], Timer]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, list[float]]:
    """Time several functions in rounds (one run of each per round); returns {name: times in seconds}.

    Each function runs ``warmup`` times untimed first. Interleaving makes slow drifts and bursts of
    load from elsewhere hit every function alike, so ratios between them stay meaningful.
    """
    for _ in range(warmup):
        for fn, timer in fns.values():
            timer(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, timer) in fns.items():
            times[name].append(timer(fn))
    return times


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median (headline), min, interquartile range, spread (IQR / median; None for a zero median) and the
    raw times (seconds) of repeated runs."""
    a = np.asarray(times, dtype=float)
    q25, q75 = np.percentile(a, [25, 75])
    median, iqr = float(np.median(a)), float(q75 - q25)
    return {
        "median_s": median,
        "min_s": float(a.min()),
        "iqr_s": iqr,
        "spread": iqr / median if median > 0 else None,
        "times_s": [float(t) for t in a],
    }


def is_noisy(summary: dict[str, Any]) -> bool:
    """Whether a ``summarize`` result spreads more than NOISY_SPREAD (IQR / median); works on older results too."""
    median, iqr = summary["median_s"], summary["iqr_s"]
    return median > 0 and iqr / median > NOISY_SPREAD


# -- the FLOP model -------------------------------------------------------------------------------
def flops(T: int, B: int, D: int, H: int, K: int, *, tokens: bool, forward_only: bool = False) -> int:
    """FLOPs of forward+BPTT (or the forward pass alone) under the model in this module's docstring.

    tokens: 6·B·H·T·(H + K) (forward 2·B·H·T·(H + K)); dense: 2·B·H·T·(2D + 3H + 3K) (forward
    2·B·H·T·(D + H + K)).
    """
    d = 0 if tokens else D
    if forward_only:
        return 2 * B * H * T * (d + H + K)
    return 2 * B * H * T * (2 * d + 3 * H + 3 * K)


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope a of log(time) = a·log(size) + c; None with fewer than 2 distinct sizes."""
    pts = [(s, t) for s, t in zip(sizes, times, strict=True) if t is not None and t > 0 and s > 0]
    if len({s for s, _ in pts}) < 2:
        return None
    lx = np.log([s for s, _ in pts])
    ly = np.log([t for _, t in pts])
    return float(np.polyfit(lx, ly, 1)[0])


# -- configuration ----------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to measure.

    backends: names ("numpy", "cupy", "auto"); seq_lens: the T sweep (at fixed_H); hidden_sizes:
    the H sweep (at fixed_T). fixed_T / fixed_H default to the middle of the other sweep's list.
    input "tokens" (x (T, B) ids, D = vocabulary) or "dense" (x (T, B, D) floats); K outputs.
    """

    backends: list[str] = field(default_factory=lambda: ["auto"])
    seq_lens: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    batch: int = 64
    input: str = "tokens"
    D: int = 256
    K: int = 256
    dtype: str = "float32"
    warmup: int = 2
    repeats: int = 10
    seed: int = 0
    compare: str = "none"
    fixed_T: int | None = None
    fixed_H: int | None = None

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {self.input!r}")
        if self.compare not in COMPARES:
            raise ValueError(f"compare must be one of {', '.join(COMPARES)}, got {self.compare!r}")
        if self.dtype not in GRAD_TOL:
            raise ValueError(f"dtype must be one of {', '.join(GRAD_TOL)}, got {self.dtype!r}")
        if not self.seq_lens or not self.hidden_sizes:
            raise ValueError("seq_lens and hidden_sizes must each hold at least one size")
        for name, v in [("batch", self.batch), ("D", self.D), ("K", self.K), ("repeats", self.repeats)]:
            if v < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if min(self.seq_lens) < 1 or min(self.hidden_sizes) < 1:
            raise ValueError(f"sizes must be ≥ 1, got seq_lens={self.seq_lens}, hidden_sizes={self.hidden_sizes}")
        if self.fixed_T is None:
            self.fixed_T = sorted(self.seq_lens)[(len(self.seq_lens) - 1) // 2]
        if self.fixed_H is None:
            self.fixed_H = sorted(self.hidden_sizes)[(len(self.hidden_sizes) - 1) // 2]

    @property
    def tokens(self) -> bool:
        """Whether inputs are one-hot token ids."""
        return self.input == "tokens"


# -- environment ----------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas_info() -> dict[str, Any]:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]  # numpy ≥ 2: returns, prints nothing
        blas = deps.get("blas", {})
        return {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k) is not None}
    except Exception:  # older numpy: no dict mode
        return {}


def _threads_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    try:
        from threadpoolctl import threadpool_info  # optional: only when the user has it
    except ImportError:
        return info
    info["threadpools"] = [
        {k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version")} for p in threadpool_info()
    ]
    return info


def environment(backends: Sequence[Backend] = ()) -> dict[str, Any]:
    """Machine, library versions, BLAS build and thread counts, and each backend's device."""
    from . import __version__

    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "python": platform.python_version(),
        "versions": {
            "gpubptt": __version__,
            "numpy": np.__version__,
            **{dist: _version(dist) for dist in ("typer", "rich", "matplotlib", "torch")},
        },
        "blas": _blas_info(),
        "threads": _threads_info(),
        "backends": [
            {"name": be.name, "device": be.device, "library": be.xp.__name__, "version": be.xp.__version__}
            for be in backends
        ],
    }


# -- references -----------------------------------------------------------------------------------
def naive_loss_and_grads(
    U: np.ndarray, W: np.ndarray, V: np.ndarray, x: np.ndarray, y: np.ndarray, *, tokens: bool
) -> tuple[float, dict[str, np.ndarray]]:
    """Textbook BPTT on the host: one sequence at a time, one time step at a time (min-char-rnn style).

    U (H, D), W (H, H), V (K, H); x (T, B) ids or (T, B, D) floats; y (T, B). Returns the summed
    cross-entropy and dU, dW, dV. No batching, no hoisting: every product is a matrix-vector product.
    """
    T, B = y.shape
    H = W.shape[0]
    dU, dW, dV = np.zeros_like(U), np.zeros_like(W), np.zeros_like(V)
    loss = 0.0
    for b in range(B):
        s, p = {-1: np.zeros(H, dtype=W.dtype)}, {}
        for t in range(T):
            u = U[:, x[t, b]] if tokens else U @ x[t, b]
            s[t] = np.tanh(u + W @ s[t - 1])
            z = V @ s[t]
            e = np.exp(z - z.max())
            p[t] = e / e.sum()
            loss += -np.log(p[t][y[t, b]])
        ds_next = np.zeros(H, dtype=W.dtype)
        for t in reversed(range(T)):
            do = p[t].copy()
            do[y[t, b]] -= 1  # backprop into the logits: softmax − onehot
            dV += np.outer(do, s[t])
            ds = V.T @ do + ds_next
            da = (1 - s[t] * s[t]) * ds  # backprop through tanh
            if tokens:
                dU[:, x[t, b]] += da
            else:
                dU += np.outer(da, x[t, b])
            dW += np.outer(da, s[t - 1])
            ds_next = W.T @ da
    return float(loss), {"U": dU, "W": dW, "V": dV}


def torch_unavailable_reason() -> str | None:
    """Why PyTorch cannot be imported here (with how to install it), or None when it can."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        return f"PyTorch is not installed ({exc}); {TORCH_HINT}"
    return None


def _rel_err(ref: np.ndarray, got: np.ndarray) -> float:
    """Normwise max relative error max|got − ref| / max|ref|."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), np.finfo(np.float64).tiny))


def _grad_errors(ref: dict[str, Any], got: dict[str, Any], dtype: str) -> dict[str, Any]:
    errs = {k: _rel_err(to_numpy(ref[k]), to_numpy(got[k])) for k in ("U", "W", "V")}
    return {"grad_rel_err": errs, "grads_match": max(errs.values()) <= GRAD_TOL[dtype]}


def torch_reference(
    model: RNN, x: Any, y: Any, grads: dict[str, Any], cfg: BenchConfig
) -> tuple[dict[str, Any], dict[str, tuple[Callable[[], Any], Timer]]]:
    """nn.RNN(bias=False, tanh) + Linear(bias=False) + cross_entropy(sum) on the same weights and data.

    Checks its gradients against ``grads`` and returns (facts, {"bptt", "forward"}: (fn, timer)).
    Arrays cross over by DLPack, so they land on the CPU for NumPy and on the GPU for CuPy. Token
    inputs are fed one-hot (nn.RNN has no token input), so torch also runs the (T·B, D)×(D, H) GEMM.
    """
    import torch
    import torch.nn.functional as F

    # FP32 against FP32: on GPUs PyTorch lets cuDNN use TF32 by default, which is faster and less exact
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

    T, B = int(y.shape[0]), int(y.shape[1])
    D, H, K = model.input_size, model.hidden_size, model.output_size
    tdtype = getattr(torch, cfg.dtype)
    U = torch.from_dlpack(model.params["U"])
    dev = U.device
    rnn = torch.nn.RNN(D, H, nonlinearity="tanh", bias=False).to(device=dev, dtype=tdtype)
    lin = torch.nn.Linear(H, K, bias=False).to(device=dev, dtype=tdtype)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(U)
        rnn.weight_hh_l0.copy_(torch.from_dlpack(model.params["W"]))
        lin.weight.copy_(torch.from_dlpack(model.params["V"]))
    xt = torch.from_dlpack(x)
    xt = F.one_hot(xt, D).to(tdtype) if cfg.tokens else xt
    yt = torch.from_dlpack(y).reshape(-1).long()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def loss_fn() -> Any:
        out, _ = rnn(xt)  # (T, B, H)
        return F.cross_entropy(lin(out).reshape(T * B, K), yt, reduction="sum")

    def fwd_bwd() -> None:
        rnn.zero_grad(set_to_none=True)
        lin.zero_grad(set_to_none=True)
        loss_fn().backward()

    def fwd() -> None:
        with torch.no_grad():
            loss_fn()

    fwd_bwd()
    got = {"U": rnn.weight_ih_l0.grad, "W": rnn.weight_hh_l0.grad, "V": lin.weight.grad}
    got = {k: v.detach().cpu().numpy() for k, v in got.items()}
    facts = {
        "version": torch.__version__,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        **_grad_errors(grads, got, cfg.dtype),
    }
    timer = sync_timer(sync)
    return facts, {"bptt": (fwd_bwd, timer), "forward": (fwd, timer)}


def _naive_measure(model: RNN, x_host: np.ndarray, y_host: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
    """Time the textbook implementation on the first few examples and scale to the whole batch."""
    B = y_host.shape[1]
    nb = min(B, NAIVE_EXAMPLES)
    xs, ys = x_host[:, :nb], y_host[:, :nb]
    U, W, V = (to_numpy(model.params[k]) for k in ("U", "W", "V"))
    _, got = naive_loss_and_grads(U, W, V, xs, ys, tokens=cfg.tokens)
    be = model.backend
    _, ref = model.loss_and_grads(be.asarray(xs), be.asarray(ys))
    errs = _grad_errors(ref, got, cfg.dtype)
    times = time_fn(
        lambda: naive_loss_and_grads(U, W, V, xs, ys, tokens=cfg.tokens),
        timer=sync_timer(lambda: None),
        warmup=min(cfg.warmup, 1),
        repeats=min(cfg.repeats, NAIVE_REPEATS),
    )
    return {"measured_examples": nb, "scale": B / nb, **errs, "bptt": summarize([t * B / nb for t in times])}


# -- one configuration ----------------------------------------------------------------------------
def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or any library's OutOfMemoryError (CuPy's, torch.cuda's), matched by class name."""
    return isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def _make_data(cfg: BenchConfig, T: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    """x (T, B) ids or (T, B, D) floats and y (T, B), on the host, from a seed fixed per (seed, T, H)."""
    rng = np.random.default_rng([cfg.seed, T, H])
    B = cfg.batch
    if cfg.tokens:
        x = rng.integers(0, cfg.D, size=(T, B))
    else:
        x = rng.standard_normal((T, B, cfg.D)).astype(cfg.dtype)
    return x, rng.integers(0, cfg.K, size=(T, B))


def gemm_references(be: Backend, T: int, B: int, H: int, K: int, cfg: BenchConfig) -> dict[str, Callable[[], None]]:
    """T back-to-back (B, H)×(H, H) GEMMs ("gemm_step") and one (T·B, H)×(H, K) GEMM ("gemm_batched").

    Both go through ``be.matmul``, the GEMM the model itself calls, in this backend's dtype.
    """
    xp = be.xp
    rng = np.random.default_rng(cfg.seed)
    s = be.asarray(rng.standard_normal((B, H)), dtype=cfg.dtype)
    W = be.asarray(rng.standard_normal((H, H)), dtype=cfg.dtype)
    hw = xp.empty((B, H), dtype=cfg.dtype)
    S = be.asarray(rng.standard_normal((T * B, H)), dtype=cfg.dtype)
    V = be.asarray(rng.standard_normal((K, H)), dtype=cfg.dtype)
    Z = xp.empty((T * B, K), dtype=cfg.dtype)

    def steps() -> None:
        for _ in range(T):
            be.matmul(s, W.T, hw)

    return {"gemm_step": steps, "gemm_batched": lambda: be.matmul(S, V.T, Z)}


def gemm_rate(
    times: dict[str, list[float]], T: int, B: int, H: int, K: int, total_flops: float
) -> tuple[dict[str, float], float]:
    """The GEMM rate a forward+BPTT of these sizes could reach, from the ``gemm_references`` times.

    The two sequential products (4·B·H²·T FLOPs) are charged at the rate of T back-to-back
    (B, H)×(H, H) GEMMs, the rest at one (T·B, H)×(H, K) GEMM: returns ({"step_gflops",
    "batched_gflops"}, the FLOP-weighted harmonic mean of the two in GFLOP/s).
    """
    rates = {
        "step_gflops": 2 * B * H * H * T / summarize(times["gemm_step"])["median_s"] / 1e9,
        "batched_gflops": 2 * T * B * H * K / summarize(times["gemm_batched"])["median_s"] / 1e9,
    }
    rec = 4 * B * H * H * T  # the two sequential products
    gemm_time = rec / (rates["step_gflops"] * 1e9) + (total_flops - rec) / (rates["batched_gflops"] * 1e9)
    return rates, total_flops / gemm_time / 1e9


def _measure(be: Backend, cfg: BenchConfig, T: int, H: int) -> dict[str, Any]:
    """Everything one row reports, for sizes T and H on backend ``be``.

    gpubptt and its GEMM references are timed interleaved (one run of each per round), so a burst of
    load from elsewhere on the machine hits them alike and the efficiency stays meaningful.
    """
    B, D, K = cfg.batch, cfg.D, cfg.K
    row: dict[str, Any] = {"backend": be.name, "T": T, "H": H, "B": B, "D": D, "K": K, "status": "ok"}
    row["flops"] = flops(T, B, D, H, K, tokens=cfg.tokens)
    row["flops_forward"] = flops(T, B, D, H, K, tokens=cfg.tokens, forward_only=True)
    try:
        x_host, y_host = _make_data(cfg, T, H)
        model = RNN(D, H, K, backend=be, dtype=cfg.dtype, seed=cfg.seed)
        x, y = be.asarray(x_host), be.asarray(y_host)
        timer = make_timer(be)
        fns = {
            "bptt": (lambda: model.loss_and_grads(x, y), timer),
            "forward": (lambda: model.loss(x, y), timer),
            **{k: (fn, timer) for k, fn in gemm_references(be, T, B, H, K, cfg).items()},
        }
        times = time_interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats)
        if cfg.compare == "torch":
            # Timed in a block of its own: interleaved with NumPy calls on a small CPU, torch's OpenMP
            # threads and OpenBLAS's threads spin against each other and torch runs ~10x slower.
            _, grads = model.loss_and_grads(x, y)
            torch_facts, torch_fns = torch_reference(model, x, y, grads, cfg)
            torch_times = time_interleaved(torch_fns, warmup=cfg.warmup, repeats=cfg.repeats)
            times.update({f"torch_{k}": v for k, v in torch_times.items()})
        bptt, fwd = summarize(times["bptt"]), summarize(times["forward"])
        t = bptt["median_s"]
        rates, gemm_gflops = gemm_rate(times, T, B, H, K, row["flops"])
        row.update(
            bptt=bptt,
            noisy=is_noisy(bptt),
            forward=fwd,
            tokens_per_s=T * B / t,
            us_per_step=t / T * 1e6,
            gflops=row["flops"] / t / 1e9,
            gflops_forward=row["flops_forward"] / fwd["median_s"] / 1e9,
            gemm={**rates, "gflops": gemm_gflops},
            efficiency=row["flops"] / t / 1e9 / gemm_gflops,
        )
        if cfg.compare == "torch":
            ref = {**torch_facts, "bptt": summarize(times["torch_bptt"]), "forward": summarize(times["torch_forward"])}
            ref["ratio"] = ref["bptt"]["median_s"] / t
            ref["ratio_forward"] = ref["forward"]["median_s"] / fwd["median_s"]
            ref["noisy"] = is_noisy(ref["bptt"])
            row["torch"] = ref
        elif cfg.compare == "naive":
            ref = _naive_measure(model, x_host, y_host, cfg)
            ref["ratio"] = ref["bptt"]["median_s"] / t
            ref["noisy"] = is_noisy(ref["bptt"])
            row["naive"] = ref
    except Exception as exc:
        if not _is_out_of_memory(exc):
            raise
        row.update(status="out of memory", error=f"{type(exc).__name__}: {exc}")
    finally:
        gc.collect()
    return row


def _plan(cfg: BenchConfig) -> list[tuple[str, int, int]]:
    """(sweep, T, H) in run order: T at fixed H, then H at fixed T."""
    return [("T", T, cfg.fixed_H) for T in cfg.seq_lens] + [("H", cfg.fixed_T, H) for H in cfg.hidden_sizes]


def _resolve_backends(names: Sequence[str]) -> list[Backend]:
    out: list[Backend] = []
    for name in names:
        be = get_backend(name)
        if be not in out:
            out.append(be)
    return out


def _fits(rows: list[dict[str, Any]], backends: list[Backend], cfg: BenchConfig) -> list[dict[str, Any]]:
    """time ∝ size^exponent per backend, implementation and sweep; ``noisy_points`` counts the noisy timings
    among the ``points`` it rests on."""
    fits = []
    impls = ["gpubptt"] + ([cfg.compare] if cfg.compare != "none" else [])
    for be in backends:
        for sweep, size, fixed in (("T", "T", {"H": cfg.fixed_H}), ("H", "H", {"T": cfg.fixed_T})):
            sel = [r for r in rows if r["backend"] == be.name and r["sweep"] == sweep and r["status"] == "ok"]
            for impl in impls:
                pts = [(r[size], (r if impl == "gpubptt" else r.get(impl, {})).get("bptt")) for r in sel]
                pts = [(s, b["median_s"], is_noisy(b)) for s, b in pts if b]
                fits.append(
                    {
                        "backend": be.name,
                        "impl": impl,
                        "sweep": sweep,
                        "fixed": fixed,
                        "exponent": fit_exponent([s for s, _, _ in pts], [t for _, t, _ in pts]),
                        "points": len(pts),
                        "noisy_points": sum(noisy for _, _, noisy in pts),
                    }
                )
    return fits


def run_bench(
    cfg: BenchConfig, *, progress: Callable[[str, int, int], None] | None = None, argv: Sequence[str] | None = None
) -> dict[str, Any]:
    """Run both sweeps on every backend of ``cfg``; returns the versioned result dict (schema SCHEMA).

    ``progress(description, done, total)`` is called before each configuration and once at the end.
    Raises BackendUnavailableError (before any work) if a requested backend cannot run here.
    """
    backends = _resolve_backends(cfg.backends)
    load_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    notes: list[str] = []
    if cfg.compare == "torch":
        reason = torch_unavailable_reason()
        if reason:
            notes.append(f"--compare torch skipped: {reason}")
            cfg = BenchConfig(**{**asdict(cfg), "compare": "none"})
    plan = _plan(cfg)
    total = len(plan) * len(backends)
    rows: list[dict[str, Any]] = []
    done = 0
    for be in backends:
        cache: dict[tuple[int, int], dict[str, Any]] = {}
        for sweep, T, H in plan:
            if progress:
                progress(f"{be.name} T={T} H={H}", done, total)
            if (T, H) not in cache:  # the (fixed T, fixed H) point sits in both sweeps: measure once
                cache[(T, H)] = _measure(be, cfg, T, H)
            rows.append({"sweep": sweep, **cache[(T, H)]})
            done += 1
    if progress:
        progress("done", done, total)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": list(argv) if argv is not None else None,
        "config": asdict(cfg),
        "environment": {**environment(backends), "load_average_at_start": load_start},
        "flop_model": {
            "tokens": "6*B*H*T*(H+K)",
            "dense": "2*B*H*T*(2*D+3*H+3*K)",
            "tokens_forward": "2*B*H*T*(H+K)",
            "dense_forward": "2*B*H*T*(D+H+K)",
            "gemm_reference": "4*B*H^2*T FLOPs at the rate of T x (B,H)x(H,H) GEMMs, the rest at one (T*B,H)x(H,K)",
        },
        "notes": notes,
        "noisy_spread": NOISY_SPREAD,
        "rows": rows,
        "fits": _fits(rows, backends, cfg),
    }


# -- output ---------------------------------------------------------------------------------------
CSV_COLUMNS = [
    "backend", "sweep", "T", "H", "B", "D", "K", "status", "flops",
    "bptt_median_s", "bptt_min_s", "bptt_iqr_s", "forward_median_s", "tokens_per_s", "us_per_step",
    "gflops", "gemm_gflops", "efficiency",
    "torch_median_s", "torch_ratio", "torch_max_grad_rel_err", "naive_median_s", "naive_ratio", "bptt_times_s",
    "bptt_spread", "noisy",
]  # fmt: skip


def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: r.get(k) for k in ("backend", "sweep", "T", "H", "B", "D", "K", "status", "flops")}
    if r["status"] == "ok":
        out.update(
            bptt_median_s=r["bptt"]["median_s"],
            bptt_min_s=r["bptt"]["min_s"],
            bptt_iqr_s=r["bptt"]["iqr_s"],
            forward_median_s=r["forward"]["median_s"],
            tokens_per_s=r["tokens_per_s"],
            us_per_step=r["us_per_step"],
            gflops=r["gflops"],
            gemm_gflops=r["gemm"]["gflops"],
            efficiency=r["efficiency"],
            bptt_times_s=";".join(f"{t:.6g}" for t in r["bptt"]["times_s"]),
            bptt_spread=r["bptt"]["spread"],
            noisy=r["noisy"],
        )
        for ref in ("torch", "naive"):
            if ref in r:
                out[f"{ref}_median_s"] = r[ref]["bptt"]["median_s"]
                out[f"{ref}_ratio"] = r[ref]["ratio"]
        if "torch" in r:
            out["torch_max_grad_rel_err"] = max(r["torch"]["grad_rel_err"].values())
    return out


def render_csv(result: dict[str, Any]) -> str:
    """One CSV line per row of ``result`` (columns CSV_COLUMNS; raw times joined by ';')."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in result["rows"]:
        w.writerow(_csv_row(r))
    return buf.getvalue()


def plot_unavailable_reason() -> str | None:
    """Why matplotlib cannot be imported here (with how to install it), or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"--plot needs matplotlib, which is not installed ({exc}); {PLOT_HINT}"
    return None


def plot_results(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Log-log PNG: forward+BPTT time vs T (fixed H) and vs H (fixed T), a line per backend and reference.

    Written atomically. Raises ImportError (with the install hint) when matplotlib is missing.
    """
    reason = plot_unavailable_reason()
    if reason:
        raise ImportError(reason)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    cfg = result["config"]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    backends = sorted({r["backend"] for r in result["rows"]})
    for ax, sweep, size, fixed in (
        (axes[0], "T", "T", f"H = {cfg['fixed_H']}"),
        (axes[1], "H", "H", f"T = {cfg['fixed_T']}"),
    ):
        for be in backends:
            rows = [r for r in result["rows"] if r["backend"] == be and r["sweep"] == sweep and r["status"] == "ok"]
            dev = next((r["torch"]["device"] for r in rows if "torch" in r), "")
            series = [
                (f"gpubptt [{be}]", lambda r: r["bptt"], "o-"),
                (f"gpubptt forward only [{be}]", lambda r: r["forward"], "o:"),
                (f"torch [{dev}, same data as {be}]", lambda r: r.get("torch", {}).get("bptt"), "s--"),
                (f"naive per-example loop [numpy, vs {be}]", lambda r: r.get("naive", {}).get("bptt"), "^--"),
            ]
            for label, get, style in series:
                pts = [(r[size], get(r)["median_s"] * 1e3) for r in rows if get(r)]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_yscale("log")
        ax.set_xlabel(f"{'sequence length T' if sweep == 'T' else 'hidden size H'}  ({fixed}, B = {cfg['batch']})")
        ax.set_ylabel("time per call, ms (median)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpubptt forward+BPTT, {cfg['input']} input, {cfg['dtype']}, D = {cfg['D']}, K = {cfg['K']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
