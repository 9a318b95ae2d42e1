"""Forward+BPTT on the performance grid, side by side with PyTorch, on one backend.

For each (T, B, D, H, K) of the grid: gpubptt's ``loss_and_grads`` and PyTorch's
``nn.RNN(bias=False) + Linear(bias=False) + cross_entropy(sum)`` forward+backward on the same
weights and data, timed interleaved (one run of each per round) after a warm-up, median of the
rounds. Also: achieved GFLOP/s and efficiency against the same-run GEMM rate of a
(T·B, H) × (H, H) product (the hidden-state work, were it not sequential); on CuPy, the plain
loop (no CUDA graph) and the rate of the batched GEMMs against ``cupy.matmul`` of the same shapes.
Gradients are checked against PyTorch's before anything is timed.

    python benchmarks/perf_grid.py --backend numpy --output benchmarks/perf-cpu.json
    python benchmarks/perf_grid.py --backend cupy --output benchmarks/perf-gpu.json

Prints one line per configuration; writes JSON with every raw time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

import gpubptt

# (T, B, D, H, K, tokens)
GRID = [
    (32, 16, 64, 128, 64, False),
    (64, 32, 128, 256, 256, False),
    (64, 32, 64, 256, 1024, False),
    (32, 32, 64, 256, 8000, False),
    (100, 1, 100, 100, 8000, True),
    (64, 64, 256, 512, 512, False),
    (16, 128, 512, 1024, 1024, False),
]


def flops(T: int, B: int, D: int, H: int, K: int, tokens: bool) -> float:
    """Forward+BPTT FLOPs: 2·B·H·T·(2D + 3H + 3K) dense, 6·B·H·T·(H + K) for one-hot tokens."""
    return 6.0 * B * H * T * (H + K) if tokens else 2.0 * B * H * T * (2 * D + 3 * H + 3 * K)


def make_sync(be):
    def sync():
        be.synchronize()
        if torch is not None and be.name == "cupy":
            torch.cuda.synchronize()

    return sync


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def torch_runner(model, x, y, tokens, device):
    """PyTorch forward+backward on gpubptt's weights and data; returns (run, grads)."""
    D, H, K = model.input_size, model.hidden_size, model.output_size
    p = {k: torch.as_tensor(gpubptt.to_numpy(v), device=device) for k, v in model.params.items()}
    rnn = torch.nn.RNN(D, H, bias=False).to(device)
    lin = torch.nn.Linear(H, K, bias=False).to(device)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(p["U"])
        rnn.weight_hh_l0.copy_(p["W"])
        lin.weight.copy_(p["V"])
    xt = torch.as_tensor(gpubptt.to_numpy(x), device=device)
    yt = torch.as_tensor(gpubptt.to_numpy(y), device=device).reshape(-1)
    if tokens:  # nn.RNN takes dense inputs: one-hot, built outside the timed region
        xt = torch.nn.functional.one_hot(xt, D).to(p["U"].dtype)
    params = (rnn.weight_ih_l0, rnn.weight_hh_l0, lin.weight)

    def run():
        for q in params:
            q.grad = None
        out, _ = rnn(xt)
        loss = torch.nn.functional.cross_entropy(lin(out).reshape(-1, K), yt, reduction="sum")
        loss.backward()

    run()
    grads = {"U": params[0].grad, "W": params[1].grad, "V": params[2].grad}
    return run, {k: v.detach().cpu().numpy() for k, v in grads.items()}


def gemm_rate(be, m, k, n, dtype, sync, repeats) -> float:
    """GFLOP/s of one (m, k) × (k, n) product through the backend's matmul."""
    xp = be.xp
    rng = np.random.default_rng(0)
    a = be.asarray(rng.normal(size=(m, k)), dtype=dtype)
    b = be.asarray(rng.normal(size=(k, n)), dtype=dtype)
    out = xp.empty((m, n), dtype=dtype)
    be.matmul(a, b, out)
    ts = [timed(lambda: be.matmul(a, b, out), sync) for _ in range(repeats)]
    return 2.0 * m * k * n / float(np.median(ts)) / 1e9


def batched_gemm_ratio(be, rows, H, K, sync, repeats) -> float:
    """The logits GEMM (rows, H) × (H, K) through gpubptt's matmul, as a fraction of cupy.matmul's rate."""
    xp = be.xp
    rng = np.random.default_rng(1)
    a = xp.asarray(rng.normal(size=(rows, H)), dtype=np.float32)
    v = xp.asarray(rng.normal(size=(K, H)), dtype=np.float32)
    out = xp.empty((rows, K), dtype=np.float32)
    be.matmul(a, v.T, out)
    xp.matmul(a, v.T, out=out)
    ours = [timed(lambda: be.matmul(a, v.T, out), sync) for _ in range(repeats)]
    ref = [timed(lambda: xp.matmul(a, v.T, out=out), sync) for _ in range(repeats)]
    return float(np.median(ref) / np.median(ours))


def peak_bytes(model, x, y) -> int:
    """Peak bytes a fresh forward+BPTT allocates (workspace included), traced on the host."""
    fresh = gpubptt.RNN.from_params(model.params, backend=model.backend)
    tracemalloc.start()
    try:
        fresh.loss_and_grads(x, y)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    be = gpubptt.get_backend(args.backend)
    sync = make_sync(be)
    device = "cuda" if be.name == "cupy" else "cpu"
    if torch is not None:
        torch.backends.cudnn.allow_tf32 = False  # compare FP32 with FP32
        torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    for T, B, D, H, K, tokens in GRID:
        rng = np.random.default_rng(0)
        model = gpubptt.RNN(D, H, K, backend=be, seed=0)
        x = be.asarray(rng.integers(0, D, (T, B)) if tokens else rng.normal(size=(T, B, D)).astype(np.float32))
        y = be.asarray(rng.integers(0, K, (T, B)))
        row = dict(T=T, B=B, D=D, H=H, K=K, tokens=tokens, flops=flops(T, B, D, H, K, tokens))
        runs = {"gpubptt": lambda m=model, x=x, y=y: m.loss_and_grads(x, y)}
        if be.supports_graphs:
            plain = gpubptt.RNN.from_params(model.params, backend=be)
            plain.use_graphs = False
            runs["gpubptt_plain_loop"] = lambda m=plain, x=x, y=y: m.loss_and_grads(x, y)
        if torch is not None:
            run_t, g_t = torch_runner(model, x, y, tokens, device)
            _, g = model.loss_and_grads(x, y)
            row["grad_rel_err_vs_torch"] = {
                k: float(np.linalg.norm(gpubptt.to_numpy(g[k]) - g_t[k]) / np.linalg.norm(g_t[k])) for k in g_t
            }
            runs["torch"] = run_t
        for fn in runs.values():
            for _ in range(args.warmup):
                fn()
        times = {k: [] for k in runs}
        for _ in range(args.repeats):  # interleaved: one run of each per round
            for k, fn in runs.items():
                times[k].append(timed(fn, sync))
        med = {k: float(np.median(v)) for k, v in times.items()}
        row["times_s"] = times
        row["median_s"] = med
        row["gflops"] = row["flops"] / med["gpubptt"] / 1e9
        row["gemm_gflops"] = gemm_rate(be, T * B, H, H, np.float32, sync, args.repeats)
        row["efficiency"] = row["gflops"] / row["gemm_gflops"]
        if "torch" in med:
            row["ratio_vs_torch"] = med["gpubptt"] / med["torch"]
        if "gpubptt_plain_loop" in med:
            row["graph_speedup"] = med["gpubptt_plain_loop"] / med["gpubptt"]
            row["batched_gemm_vs_cupy_matmul"] = batched_gemm_ratio(be, T * B, H, K, sync, args.repeats)
        if be.name == "numpy":
            row["peak_bytes"] = peak_bytes(model, x, y)
            row["T_B_K_bytes"] = T * B * K * 4
        rows.append(row)
        parts = [f"T={T:<3} B={B:<3} D={D:<3} H={H:<4} K={K:<4}{' tok' if tokens else '    '}"]
        parts.append(f"gpubptt {med['gpubptt'] * 1e3:8.3f} ms  {row['gflops']:7.1f} GFLOP/s ({row['efficiency']:.0%})")
        if "torch" in med:
            parts.append(f"torch {med['torch'] * 1e3:8.3f} ms  ratio {row['ratio_vs_torch']:.2f}")
        if "graph_speedup" in row:
            parts.append(f"graph x{row['graph_speedup']:.1f}  gemm {row['batched_gemm_vs_cupy_matmul']:.0%}")
        if "peak_bytes" in row:
            parts.append(f"peak {row['peak_bytes'] / 2**20:.0f} MiB (T·B·K {row['T_B_K_bytes'] / 2**20:.0f} MiB)")
        print("  ".join(parts), flush=True)
    ratios = [r["ratio_vs_torch"] for r in rows if "ratio_vs_torch" in r]
    summary = {
        "schema": "gpubptt-perf-grid/1",
        "backend": be.name,
        "device": be.device,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": None if torch is None else torch.__version__,
        "gpubptt": gpubptt.__version__,
        "repeats": args.repeats,
        "median_ratio_vs_torch": float(np.median(ratios)) if ratios else None,
        "max_ratio_vs_torch": float(np.max(ratios)) if ratios else None,
        "rows": rows,
    }
    if ratios:
        print(f"ratio vs torch: median {summary['median_ratio_vs_torch']:.2f}, max {summary['max_ratio_vs_torch']:.2f}")
    if args.output:
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(tmp, args.output)
    return 0


try:
    import torch
except ImportError:  # the comparison is optional
    torch = None
    print("torch not installed: timing gpubptt alone (pip install torch for the comparison)", file=sys.stderr)

if __name__ == "__main__":
    sys.exit(main())
