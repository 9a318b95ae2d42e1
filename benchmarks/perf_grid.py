"""Forward+BPTT on the performance grid, side by side with PyTorch, on one backend.

For each (T, B, D, H, K) of the grid: gpubptt's ``loss_and_grads`` and PyTorch's
``nn.RNN(bias=False) + Linear(bias=False) + cross_entropy(sum)`` forward+backward on the same
weights and data (``gpubptt.bench.torch_reference``, which first checks the gradients agree),
timed interleaved: each round runs gpubptt, its GEMM references and torch once, with a pause
between the two libraries so neither one's spinning worker threads slow the other down. Median
of the rounds. Also: achieved GFLOP/s and efficiency against the same-run GEMM rate
(``gpubptt.bench.gemm_rate``); on NumPy, the peak memory a fresh call allocates; on CuPy, the
plain loop (per-step cuBLAS and elementwise launches, no CUDA graph) and the rate of the batched
GEMM against ``cupy.matmul``.

    python benchmarks/perf_grid.py OUT_DIR --backend numpy               # OUT_DIR/perf-numpy.json and .txt
    python benchmarks/perf_grid.py OUT_DIR --backend numpy --grid deep   # OUT_DIR/perf-numpy-deep.json
    python benchmarks/perf_grid.py OUT_DIR --backend cupy

OUT_DIR defaults to a new folder under the system's temporary directory (never inside the repository);
``--output FILE`` names the JSON file instead. Each row also records the BLAS behind the backend's
matmul and its thread counts (the NumPy backend runs per-step GEMMs on one thread, batched ones on
all). Prints one line per configuration; the JSON has every raw time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import gpubptt
from gpubptt import bench
from gpubptt._io import write_atomic
from gpubptt.backend.precision import PRECISIONS
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
# deep rows: (T, B, D, H, K, tokens, num_layers, bidirectional, nonlinearity)
DEEP_GRID = [
    (64, 32, 128, 256, 256, False, 2, False, "tanh"),
    (64, 32, 128, 256, 256, False, 3, False, "tanh"),
    (64, 32, 128, 256, 256, False, 2, True, "tanh"),
    (64, 32, 128, 256, 256, False, 2, False, "relu"),
    (16, 128, 512, 1024, 1024, False, 2, False, "tanh"),
]
PAUSE_S = 0.2  # between the two libraries in a round: long enough for idle BLAS/OpenMP threads to sleep


def batched_gemm_vs_library(be, rows: int, H: int, K: int, timer, repeats: int) -> float:
    """The logits GEMM (rows, H) × (H, K) through gpubptt's matmul, as a fraction of ``xp.matmul``'s rate."""
    xp = be.xp
    rng = np.random.default_rng(1)
    a = be.asarray(rng.normal(size=(rows, H)), dtype=np.float32)
    v = be.asarray(rng.normal(size=(K, H)), dtype=np.float32)
    out = xp.empty((rows, K), dtype=np.float32)
    times = bench.time_interleaved(
        {"ours": (lambda: be.matmul(a, v.T, out), timer), "lib": (lambda: xp.matmul(a, v.T, out=out), timer)},
        warmup=2,
        repeats=repeats,
    )
    return float(np.median(times["lib"]) / np.median(times["ours"]))


def plain_loop(model, x, y):
    """The plain CuPy loop: per-step cuBLAS GEMMs and elementwise kernels, no graph, no fused kernels."""
    return model.loss_and_grads(x, y)  # the model was built with use_graphs off and step_kernels "cublas"


def peak_bytes(model, x, y) -> int:
    """Peak bytes one forward+BPTT allocates on a fresh model (its workspace included), traced on the host."""
    fresh = gpubptt.RNN.from_params(model.params, backend=model.backend, nonlinearity=model.nonlinearity)
    tracemalloc.start()
    try:
        fresh.loss_and_grads(x, y)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(be, T, B, D, H, K, tokens, args, have_torch, layers=1, bidirectional=False, nonlinearity="tanh") -> dict:
    arch = dict(num_layers=layers, bidirectional=bidirectional, nonlinearity=nonlinearity)
    cfg = bench.BenchConfig(
        backends=[be.name], seq_lens=[T], hidden_sizes=[H], batch=B, D=D, K=K,
        input="tokens" if tokens else "dense", compare="torch" if have_torch else "none", **arch,
        precision=args.precision,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, K, backend=be, seed=0, bias=False, precision=args.precision, **arch)
    x = be.asarray(rng.integers(0, D, (T, B)) if tokens else rng.normal(size=(T, B, D)).astype(np.float32))
    y = be.asarray(rng.integers(0, K, (T, B)))
    timer = be.timer()
    ours = {"gpubptt": (lambda: model.loss_and_grads(x, y), timer)}
    if be.supports_graphs:
        plain = gpubptt.RNN.from_params(model.params, backend=be, nonlinearity=nonlinearity, precision=args.precision)
        plain.use_graphs, plain.step_kernels = False, "cublas"
        ours["gpubptt_plain_loop"] = (lambda: plain_loop(plain, x, y), timer)
    ours.update({k: (fn, timer) for k, fn in bench.gemm_references(model.backend, T, B, H, K, cfg).items()})
    dirs = 2 if bidirectional else 1
    row = dict(T=T, B=B, D=D, H=H, K=K, tokens=tokens, precision=args.precision, **arch)
    row["flops"] = bench.flops(T, B, D, H, K, tokens=tokens, num_layers=layers, dirs=dirs)
    theirs = {}
    if have_torch:
        _, grads = model.loss_and_grads(x, y)
        facts, torch_fns = bench.torch_reference(model, x, y, grads, cfg)
        row["torch"] = facts
        theirs = {"torch": torch_fns["bptt"]}
    for _ in range(args.warmup):
        for fn, t in (*ours.values(), *theirs.values()):
            t(fn)
    times = {k: [] for k in (*ours, *theirs)}
    for _ in range(args.repeats):
        for group in (ours, theirs):
            for k, (fn, t) in group.items():
                times[k].append(t(fn))
            time.sleep(PAUSE_S)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rates, gemm_gflops = bench.gemm_rate(times, T, B, H, K, row["flops"], recurrences=model.num_states)
    row.update(times_s=times, median_s=med, gflops=row["flops"] / med["gpubptt"] / 1e9, gemm=rates)
    row["efficiency"] = row["gflops"] / gemm_gflops
    if "torch" in med:
        row["ratio_vs_torch"] = med["gpubptt"] / med["torch"]
    row["noisy"] = any(is_noisy(times[k]) for k in ("gpubptt", "torch") if k in times)  # IQR/median > 10 %
    if "gpubptt_plain_loop" in med:
        row["graph_speedup"] = med["gpubptt_plain_loop"] / med["gpubptt"]
        row["batched_gemm_vs_library"] = batched_gemm_vs_library(be, T * B, H, K, timer, args.repeats)
    row["blas"] = blas_facts(be)
    if be.name == "numpy":
        row["peak_bytes"] = peak_bytes(model, x, y)
        row["T_B_K_bytes"] = T * B * K * 4
    return row


def describe(row: dict) -> str:
    T, B, D, H, K = (row[k] for k in "TBDHK")
    med = row["median_s"]
    parts = [f"{NOISY_MARK if row.get('noisy') else ' '}T={T:<3} B={B:<3} D={D:<3} H={H:<4} K={K:<4}"
             f"{' tok' if row['tokens'] else '    '}"]  # fmt: skip
    if row.get("num_layers", 1) > 1 or row.get("bidirectional") or row.get("nonlinearity", "tanh") != "tanh":
        bi = " bi" if row.get("bidirectional") else ""
        parts.append(f"L={row.get('num_layers', 1)}{bi} {row.get('nonlinearity', 'tanh')}")
    parts.append(
        f"gpubptt {med['gpubptt'] * 1e3:8.3f} ms {row['gflops']:7.1f} GFLOP/s ({row['efficiency']:.0%} of GEMM)"
    )
    if "torch" in med:
        parts.append(f"torch {med['torch'] * 1e3:8.3f} ms  ratio {row['ratio_vs_torch']:.2f}")
    if "graph_speedup" in row:
        parts.append(f"graph x{row['graph_speedup']:.1f}  batched GEMM {row['batched_gemm_vs_library']:.0%}")
    if "peak_bytes" in row:
        parts.append(f"peak {row['peak_bytes'] / 2**20:.1f} MiB (T·B·K {row['T_B_K_bytes'] / 2**20:.1f} MiB)")
    return "  ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    add_streams_option(ap)
    ap.add_argument(
        "--step-kernels",
        default="auto",
        choices=["auto", "cublas", "fused", "persistent"],
        help="CuPy: the recurrence steps' kernels for every model (backend.step_kernels; auto: timed per shape)",
    )
    ap.add_argument(
        "--nonlinearity",
        default=None,
        choices=["tanh", "relu"],
        help="every row with this Elman nonlinearity (default: each row's own, tanh but for the deep relu row)",
    )
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="GEMM precision (torch matches it)")
    ap.add_argument("--rows", default="all", help="'all', or indices into the planned rows, comma-separated")
    ap.add_argument("out_dir", nargs="?", default=None, help="folder for the results (default: a new temporary one)")
    ap.add_argument("--output", default=None, help="the JSON file (default: OUT_DIR/perf-BACKEND[-GRID].json)")
    ap.add_argument(
        "--grid",
        default="default",
        choices=["default", "deep", "all"],
        help="the one-layer rows, the deep rows, or both",
    )
    args = ap.parse_args()
    streams = streams_suffix(ap, args)
    if args.step_kernels in ("fused", "persistent") and args.precision != "fp32":
        ap.error(f"--step-kernels {args.step_kernels} multiplies in float32: it runs with --precision fp32 only")
    be = open_backend(args)
    be.step_kernels = args.step_kernels
    reason = bench.torch_unavailable_reason()
    if reason:
        print(f"timing gpubptt alone: {reason}", file=sys.stderr)
    rows, lines = [], []
    plan = [(*g, 1, False, "tanh") for g in GRID] if args.grid in ("default", "all") else []
    plan += DEEP_GRID if args.grid in ("deep", "all") else []
    plan = plan if args.rows == "all" else [plan[int(i)] for i in args.rows.split(",")]
    if args.nonlinearity:
        plan = [(*row[:-1], args.nonlinearity) for row in plan]
    for T, B, D, H, K, tokens, layers, bidirectional, nonlinearity in plan:
        rows.append(measure(be, T, B, D, H, K, tokens, args, reason is None, layers, bidirectional, nonlinearity))
        lines.append(describe(rows[-1]))
        print(lines[-1], flush=True)
    compared = [r for r in rows if "ratio_vs_torch" in r]
    summary, stats = summary_ratio(compared, "ratio vs torch", key="ratio_vs_torch")  # clean rows only
    result = {
        "schema": "gpubptt-perf-grid/2",
        "command": " ".join(sys.argv),
        "environment": environment([be]),
        "repeats": args.repeats,
        "precision": args.precision,
        "concurrent": be.concurrent,  # a bidirectional layer's directions at once (CuPy: on two streams)
        "step_kernels": args.step_kernels,
        "median_ratio_vs_torch": None if stats is None else stats["median"],  # over the rows not noisy
        "max_ratio_vs_torch": None if stats is None else stats["max"],
        "summary_vs_torch": stats,
        "kernel_choices": be.kernel_choices(),
        "blas": blas_facts(be),
        "rows": rows,
    }
    if compared:
        lines.append(summary)
        print(lines[-1])
    output = Path(args.output) if args.output else None
    if output is None:
        folder = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="gpubptt-perf-"))
        folder.mkdir(parents=True, exist_ok=True)
        grid = "" if args.grid == "default" else "-" + args.grid
        suffix = ("" if args.precision == "fp32" else "-" + args.precision) + streams
        suffix += "" if args.step_kernels == "auto" else "-" + args.step_kernels
        suffix += "" if args.nonlinearity is None else "-" + args.nonlinearity
        output = folder / f"perf-{be.name}{grid}{suffix}.json"
    write_atomic(str(output), json.dumps(result, indent=1))
    write_atomic(str(output.with_suffix(".txt")), "\n".join(lines) + "\n")
    print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
