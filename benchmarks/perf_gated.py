"""GRU and LSTM forward+BPTT side by side with PyTorch's nn.GRU / nn.LSTM + Linear, on one backend.

The rows of issue 11: (T=64, B=32, D=128, H=256, K=256) and the perf grid's largest configuration
(T=16, B=128, D=512, H=1024, K=1024), each with 1 and 2 layers, for both cells, and the first shape
with 2 bidirectional layers (issue 22). Each row:
gpubptt's ``loss_and_grads`` and torch's ``nn.GRU``/``nn.LSTM(bias=False) + Linear(bias=False) +
cross_entropy(sum)`` (``--bias``: both with biases, the defaults users get) forward+backward on the same
weights and data (the gradients are checked to agree first), float32, timed interleaved: each round runs
gpubptt once and torch once, with a pause between the two libraries so neither one's idle worker threads
slow the other. Median of the rounds;
the ratio is gpubptt's median over torch's, from the same run. ``--warm N`` also times N more calls of each
library back to back after its first of the round (as a training loop runs them), reported beside it.
Also per row: GFLOP/s (the GEMM FLOPs of ``gpubptt.bench.flops``, gate arithmetic not counted), the
fraction of the same-run GEMM rate (T back-to-back (B, H) × (H, G·H) step GEMMs and one (T·B, H) × (H, K)
batched GEMM through the backend's own matmul, each charged for its share of the FLOPs), and the BLAS with
its thread counts.

    python benchmarks/perf_gated.py OUT_DIR --backend numpy     # OUT_DIR/perf-gated-numpy.json and .txt
    python benchmarks/perf_gated.py OUT_DIR --backend cupy
    python benchmarks/perf_gated.py OUT_DIR --jit-compare       # also the NumPy step kernels, same rounds

OUT_DIR defaults to a new folder under the system's temporary directory (never inside the repository);
``--output FILE`` names the JSON file instead. Prints one line per row; the JSON has every raw time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib import import_module
from pathlib import Path

import numpy as np

import gpubptt
from gpubptt.backend.precision import PRECISIONS
from gpubptt.bench import flops
from gpubptt.cells._jit import jit_library
from gpubptt.environment import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import (
    NOISY_MARK,
    add_streams_option,
    blas_facts,
    is_noisy,
    open_backend,
    streams_suffix,
    summary_ratio,
)

# (cell, T, B, D, H, K, num_layers, bidirectional)
ROWS = [
    (cell, *shape, layers, False)
    for cell in ("gru", "lstm")
    for shape in ((64, 32, 128, 256, 256), (16, 128, 512, 1024, 1024))
    for layers in (1, 2)
] + [(cell, 64, 32, 128, 256, 256, 2, True) for cell in ("gru", "lstm")]
PAUSE_S = 0.2
GATES = {"gru": 3, "lstm": 4}


def gemm_references(be, T: int, B: int, H: int, G: int, K: int) -> dict:
    """T back-to-back (B, H) × (H, G·H) GEMMs (a gated step) and one (T·B, H) × (H, K) GEMM, via ``be.matmul``."""
    rng = np.random.default_rng(1)
    s = be.asarray(rng.standard_normal((B, H)), dtype=np.float32)
    W = be.asarray(rng.standard_normal((G * H, H)), dtype=np.float32)
    hw = be.xp.empty((B, G * H), dtype=np.float32)
    S = be.asarray(rng.standard_normal((T * B, H)), dtype=np.float32)
    V = be.asarray(rng.standard_normal((K, H)), dtype=np.float32)
    Z = be.xp.empty((T * B, K), dtype=np.float32)

    def steps() -> None:
        Wt = be.pack(W.T, B, T)  # as the cells' step loops: packed once per loop where the backend packs
        for _ in range(T):
            be.matmul(s, Wt, hw)
        be.synchronize()

    def batched() -> None:
        be.matmul(S, V.T, Z)
        be.synchronize()

    return {"gemm_step": steps, "gemm_batched": batched}


def torch_side(model, x, y, grads):
    """nn.GRU / nn.LSTM + Linear on the model's weights, on its device, at the model's precision (FP32; TF32
    matmuls and cuDNN; bf16 autocast with the softmax in float32): (fwd_bwd, sync, max rel grad err)."""
    import torch
    import torch.nn.functional as F

    torch.backends.cudnn.allow_tf32 = model.precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = model.precision == "tf32"
    T, B = y.shape
    D, H, K = model.input_size, model.hidden_size, model.output_size
    module = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[model.cell_name]
    U = torch.from_dlpack(model.params["U"])
    dirs = 2 if model.bidirectional else 1
    rnn = module(D, H, num_layers=model.num_layers, bias=model.bias, bidirectional=model.bidirectional)
    rnn = rnn.to(device=U.device, dtype=torch.float32)
    lin = torch.nn.Linear(H * dirs, K, bias=model.bias).to(device=U.device, dtype=torch.float32)
    sd, lsd = model.to_torch()
    rnn.load_state_dict({k: torch.as_tensor(v).to(U.device) for k, v in sd.items()})
    lin.load_state_dict({k: torch.as_tensor(v).to(U.device) for k, v in lsd.items()})
    xt, yt = torch.from_dlpack(x), torch.from_dlpack(y).reshape(-1).long()
    sync = torch.cuda.synchronize if U.device.type == "cuda" else (lambda: None)

    autocast = torch.autocast(U.device.type, dtype=torch.bfloat16, enabled=model.precision == "bf16")

    def fwd_bwd() -> None:
        rnn.zero_grad(set_to_none=True)
        lin.zero_grad(set_to_none=True)
        with autocast:
            out, _ = rnn(xt)
            z = lin(out).reshape(T * B, K)
        F.cross_entropy(z.float(), yt, reduction="sum").backward()

    fwd_bwd()
    g_rnn, _ = model.to_torch(grads=grads)
    err = 0.0
    for name, p in rnn.named_parameters():
        ref = p.grad.detach().cpu().numpy()
        err = max(err, float(np.abs(g_rnn[name] - ref).max() / (np.abs(ref).max() + 1e-30)))
    return fwd_bwd, sync, err


def numpy_twins(be, cell: str, run):
    """``run`` with the cell's NumPy step kernels in place of its compiled twins (``GPUBPTT_JIT=numpy``), for
    one call: the compiled kernels' gain measured in the same rounds."""
    kernels = import_module(f"gpubptt.cells.{cell}").kernels(be)

    def twins() -> None:
        compiled, kernels.jit = kernels.jit, None
        try:
            run()
        finally:
            kernels.jit = compiled

    return twins


def measure(be, cell, T, B, D, H, K, layers, bi, args) -> dict:
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(
        D,
        H,
        K,
        cell=cell,
        num_layers=layers,
        bidirectional=bi,
        backend=be,
        seed=0,
        init="torch",
        bias=args.bias,
        precision=args.precision,
    )
    x = be.asarray(rng.normal(size=(T, B, D)).astype(np.float32))
    y = be.asarray(rng.integers(0, K, (T, B)))
    _, grads = model.loss_and_grads(x, y)
    torch_fn, sync, err = torch_side(model, x, y, grads)

    def ours() -> None:
        model.loss_and_grads(x, y)
        be.synchronize()

    def theirs() -> None:
        torch_fn()
        sync()

    G = GATES[cell]
    fns = {"gpubptt": ours, **gemm_references(model.backend, T, B, H, G, K), "torch": theirs}  # same precision
    if args.jit_compare:
        fns = {"gpubptt_numpy_twins": numpy_twins(be, cell, ours), **fns}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    if args.warm:
        times.update(gpubptt_warm=[], torch_warm=[])
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            for _ in range(args.warm if name in ("gpubptt", "torch") else 0):  # back to back, as a training loop
                t0 = time.perf_counter()
                fn()
                times[f"{name}_warm"].append(time.perf_counter() - t0)
            if name in ("gemm_batched", "torch"):  # a pause between the two libraries
                time.sleep(PAUSE_S)
    med = {k: float(np.median(v)) for k, v in times.items()}
    dirs = 2 if bi else 1
    total = flops(T, B, D, H, K, tokens=False, num_layers=layers, dirs=dirs, gates=G)
    rec = 2 * (2 * B * H * G * H * T) * layers * dirs  # the two sequential products of every recurrence
    step_rate = 2 * B * H * G * H * T / med["gemm_step"]
    batched_rate = 2 * T * B * H * K / med["gemm_batched"]
    gemm_gflops = total / (rec / step_rate + (total - rec) / batched_rate) / 1e9
    gflops = total / med["gpubptt"] / 1e9
    return dict(cell=cell, T=T, B=B, D=D, H=H, K=K, num_layers=layers, bidirectional=bi, bias=args.bias,
                flops=total, precision=args.precision,
                times_s=times, median_s=med, ratio_vs_torch=med["gpubptt"] / med["torch"],
                gflops=gflops, torch_gflops=total / med["torch"] / 1e9,
                gemm={"step_gflops": step_rate / 1e9, "batched_gflops": batched_rate / 1e9},
                efficiency=gflops / gemm_gflops, blas=blas_facts(be), max_rel_grad_err=err,
                noisy=is_noisy(times["gpubptt"]) or is_noisy(times["torch"]),
                **({"ratio_warm_vs_torch": med["gpubptt_warm"] / med["torch_warm"]} if args.warm else {}))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    add_streams_option(ap)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--warm",
        type=int,
        default=0,
        help="also N calls back to back after each library's first call of a round, as a training loop runs "
        "(the headline ratio stays the first call's, after the pause)",
    )
    ap.add_argument("--rows", default="all", help="'all', or indices into the rows, comma-separated (0-9)")
    ap.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="GEMM precision (torch matches it)")
    ap.add_argument(
        "--bias",
        action="store_true",
        help="both libraries with biases (their defaults: b and c; torch's bias_ih, bias_hh and Linear's bias)",
    )
    ap.add_argument(
        "--jit-compare",
        action="store_true",
        help="also time gpubptt on the NumPy step kernels (GPUBPTT_JIT=numpy) in the same rounds",
    )
    ap.add_argument("out_dir", nargs="?", default=None, help="folder for the results (default: a new temporary one)")
    ap.add_argument("--output", default=None, help="the JSON file (default: OUT_DIR/perf-gated-BACKEND.json)")
    args = ap.parse_args()
    streams = streams_suffix(ap, args)
    if args.warm < 0:
        ap.error(f"--warm {args.warm}: expected a count of calls, 0 or more")
    # the backend before torch: its MKL then picks its threading layer as for a user of gpubptt alone (a torch
    # imported first has loaded GNU OpenMP, and MKL takes that layer: docs/performance.md), as in perf_grid.py
    be = open_backend(args)
    try:
        import torch
    except ImportError as exc:
        print(f"this benchmark compares with torch, which is not installed ({exc})", file=sys.stderr)
        return 1
    rows = ROWS if args.rows == "all" else [ROWS[int(i)] for i in args.rows.split(",")]
    out, lines = [], []
    for cell, T, B, D, H, K, layers, bi in rows:
        row = measure(be, cell, T, B, D, H, K, layers, bi, args)
        out.append(row)
        med = row["median_s"]
        lines.append(
            f"{NOISY_MARK if row['noisy'] else ' '}{cell:>4} L={layers}{' bi' if bi else '   '}"
            f" T={T:<3} B={B:<3} D={D:<3} H={H:<4} K={K:<4}{' +bias' if args.bias else ''}"
            f"  gpubptt {med['gpubptt'] * 1e3:8.2f} ms {row['gflops']:6.1f} GFLOP/s ({row['efficiency']:.0%} of GEMM)"
            f"  torch {med['torch'] * 1e3:8.2f} ms  ratio {row['ratio_vs_torch']:.2f}"
            f"  (grads agree to {row['max_rel_grad_err']:.1e})"
            + (f"  NumPy kernels {med['gpubptt_numpy_twins'] * 1e3:.2f} ms" if "gpubptt_numpy_twins" in med else "")
            + (
                f"  back to back {med['gpubptt_warm'] * 1e3:.2f} against {med['torch_warm'] * 1e3:.2f} ms, ratio "
                f"{row['ratio_warm_vs_torch']:.2f}"
                if args.warm
                else ""
            )
        )
        print(lines[-1], flush=True)
    summary, stats = summary_ratio(out, "ratio vs torch", key="ratio_vs_torch")  # clean rows only
    lines.append(summary)
    print(lines[-1])
    env = {"gpubptt": gpubptt.__version__, "numpy": np.__version__, "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
           "machine": platform.machine(), "backend": be.name, "device": be.device,
           "precision": args.precision, "bias": args.bias, "jit": jit_library(be.name),
           "concurrent": be.concurrent}  # fmt: skip
    result = {"benchmark": "perf_gated", "command": " ".join(sys.argv), "environment": env,
              "full_environment": environment([be]), "blas": blas_facts(be),
              "median_ratio_vs_torch": None if stats is None else stats["median"],
              "max_ratio_vs_torch": None if stats is None else stats["max"], "summary_vs_torch": stats,
              "rows": out}  # fmt: skip
    output = Path(args.output) if args.output else None
    if output is None:
        folder = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="gpubptt-perf-"))
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ("" if args.precision == "fp32" else "-" + args.precision) + ("-bias" if args.bias else "") + streams
        output = folder / f"perf-gated-{be.name}{suffix}.json"
    output.write_text(json.dumps(result, indent=1))
    output.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
