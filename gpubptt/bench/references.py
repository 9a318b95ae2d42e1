"""The references forward+BPTT is compared with: the textbook per-example loop, PyTorch, plain GEMMs.

Each reference checks its gradients against gpubptt's before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..backend import Backend, to_numpy
from ..model import RNN
from ..timing import Timer, summarize, sync_timer, time_fn
from .config import GRAD_TOL, BenchConfig

__all__ = [
    "gemm_references",
    "naive_loss_and_grads",
    "naive_measure",
    "torch_reference",
    "torch_unavailable_reason",
]

TORCH_HINT = "install PyTorch with `pip install torch` (a CPU build is enough for the CPU comparison)"
#: The naive reference times this many examples of the batch and scales by B / that (each example
#: costs the same, independently), with at most NAIVE_REPEATS timed runs, so a default run stays short.
NAIVE_EXAMPLES = 4
NAIVE_REPEATS = 3


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


def _grad_errors(ref: dict[str, Any], got: dict[str, Any], dtype: str, tol: float | None = None) -> dict[str, Any]:
    errs = {k: _rel_err(to_numpy(ref[k]), to_numpy(got[k])) for k in got if k in ref and k != "s0"}
    return {"grad_rel_err": errs, "grads_match": max(errs.values()) <= (GRAD_TOL[dtype] if tol is None else tol)}


@contextmanager
def _tf32(torch: Any, enabled: bool) -> Iterator[None]:
    """torch's TF32 flags set to ``enabled`` for the block and restored after it: the model's precision against
    torch's matching setting (on GPUs PyTorch lets cuDNN use TF32 by default, faster and less exact), without
    changing the flags for the rest of the process (a caller's own torch code)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def torch_reference(
    model: RNN, x: Any, y: Any, grads: dict[str, Any], cfg: BenchConfig
) -> tuple[dict[str, Any], dict[str, tuple[Callable[[], Any], Timer]]]:
    """nn.RNN(num_layers, bidirectional, nonlinearity, bias=False) + Linear(bias=False) + cross_entropy(sum)
    on the same weights and data.

    Checks its gradients against ``grads`` and returns (facts, {"bptt", "forward"}: (fn, timer)).
    Arrays cross over by DLPack, so they land on the CPU for NumPy and on the GPU for CuPy. Token
    inputs are fed one-hot (nn.RNN has no token input), so torch also runs the (T·B, D)×(D, H) GEMM.
    """
    import torch
    import torch.nn.functional as F

    T, B = int(y.shape[0]), int(y.shape[1])
    D, H, K = model.input_size, model.hidden_size, model.output_size
    tdtype = getattr(torch, cfg.dtype)
    dev = torch.from_dlpack(model.params["U"]).device
    arch = dict(num_layers=model.num_layers, bidirectional=model.bidirectional, bias=False)
    if model.cell.takes_nonlinearity:
        arch["nonlinearity"] = model.nonlinearity
    # the cell's torch module (nn.RNN, nn.GRU, nn.LSTM): the same gate order and weight shapes as gpubptt's
    rnn = getattr(torch.nn, model.cell.torch_module.removeprefix("nn."))(D, H, **arch)
    rnn = rnn.to(device=dev, dtype=tdtype)
    lin = torch.nn.Linear(H * model.num_directions, K, bias=False).to(device=dev, dtype=tdtype)
    rnn_sd, lin_sd = model.to_torch()  # torch's names (host copies)
    rnn.load_state_dict({k: torch.as_tensor(v, device=dev) for k, v in rnn_sd.items()})
    lin.load_state_dict({k: torch.as_tensor(v, device=dev) for k, v in lin_sd.items()})
    xt = torch.from_dlpack(x)
    xt = F.one_hot(xt, D).to(tdtype) if cfg.tokens else xt
    yt = torch.from_dlpack(y).reshape(-1).long()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    # bf16: autocast (FP32 weights), as the model keeps FP32 master weights
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    tf32 = cfg.precision == "tf32"

    def loss_fn() -> Any:
        with autocast:
            out, _ = rnn(xt)  # (T, B, H·dirs)
            z = lin(out).reshape(T * B, K)
        return F.cross_entropy(z.to(tdtype), yt, reduction="sum")  # the softmax in the model's dtype, as gpubptt's

    def fwd_bwd() -> None:
        rnn.zero_grad(set_to_none=True)
        lin.zero_grad(set_to_none=True)
        with _tf32(torch, tf32):  # the backward's GEMMs read the flags too
            loss_fn().backward()

    def fwd() -> None:
        with torch.no_grad(), _tf32(torch, tf32):
            loss_fn()

    fwd_bwd()
    theirs = {k: v.grad.detach().cpu().numpy() for k, v in rnn.named_parameters()}
    theirs["weight"] = lin.weight.grad.detach().cpu().numpy()
    ours_rnn, ours_lin = model.to_torch(grads=grads)
    ours = {**ours_rnn, "weight": ours_lin["weight"]}
    facts = {
        "version": torch.__version__,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        **_grad_errors(ours, theirs, cfg.dtype, cfg.grad_tol),
        "settings": {
            "cudnn.allow_tf32": tf32,
            "cuda.matmul.allow_tf32": tf32,
            "autocast": "bfloat16" if cfg.precision == "bf16" else None,
        },
    }
    timer = sync_timer(sync)
    return facts, {"bptt": (fwd_bwd, timer), "forward": (fwd, timer)}


def naive_measure(model: RNN, x_host: np.ndarray, y_host: np.ndarray, cfg: BenchConfig) -> dict[str, Any]:
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


def gemm_references(
    be: Backend, T: int, B: int, H: int, K: int, cfg: BenchConfig, gates: int = 1
) -> dict[str, Callable[[], None]]:
    """T back-to-back (B, H)×(H, G·H) GEMMs ("gemm_step", G = ``gates``: a step of a cell with G gates) and one
    (T·B, H)×(H, K) GEMM ("gemm_batched").

    Both go through ``be.matmul``, the GEMM the model itself calls, in this backend's dtype.
    """
    xp = be.xp
    rng = np.random.default_rng(cfg.seed)
    s = be.asarray(rng.standard_normal((B, H)), dtype=cfg.dtype)
    W = be.asarray(rng.standard_normal((gates * H, H)), dtype=cfg.dtype)
    hw = xp.empty((B, gates * H), dtype=cfg.dtype)
    S = be.asarray(rng.standard_normal((T * B, H)), dtype=cfg.dtype)
    V = be.asarray(rng.standard_normal((K, H)), dtype=cfg.dtype)
    Z = xp.empty((T * B, K), dtype=cfg.dtype)

    def steps() -> None:
        Wt = be.pack(W.T, B, T)  # as the cells' step loops: packed once per loop where the backend packs
        for _ in range(T):
            be.matmul(s, Wt, hw)

    return {"gemm_step": steps, "gemm_batched": lambda: be.matmul(S, V.T, Z)}
