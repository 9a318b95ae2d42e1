"""Recomputation against the stored path on the performance grid: time ratio and measured peak memory.

For each (T, B, D, H, K) of ``perf_grid.GRID``: ``loss_and_grads`` with every state stored and with
``recompute="sqrt"``, timed interleaved (median of the rounds), and the peak bytes one call on a
fresh model allocates (tracemalloc on NumPy, the memory pool's growth on CuPy).

    python benchmarks/recompute_grid.py --backend numpy --output benchmarks/recompute-grid-cpu.json

Prints one line per configuration; writes JSON with every raw time.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import gpubptt
from gpubptt import bench
from gpubptt._io import write_atomic
from gpubptt.bench.long import _measure
from gpubptt.environment import environment

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from perf_grid import GRID


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output")
    args = ap.parse_args()
    be = gpubptt.get_backend(args.backend)
    timer = be.timer()
    rows = []
    for T, B, D, H, K, tokens in GRID:
        rng = np.random.default_rng(0)
        model = gpubptt.RNN(D, H, K, backend=be, seed=0, bias=False)
        x = be.asarray(rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D)).astype(np.float32))
        y = be.asarray(rng.integers(0, K, size=(T, B)))
        runs = {
            "none": (lambda m=model, x=x, y=y: m.loss_and_grads(x, y), timer),
            "sqrt": (lambda m=model, x=x, y=y: m.loss_and_grads(x, y, recompute="sqrt"), timer),
        }
        times = bench.time_interleaved(runs, warmup=2, repeats=args.repeats)
        med = {k: float(np.median(v)) for k, v in times.items()}
        peaks = {k: _measure(be, model, x, None if k == "none" else k, y=y)[1] for k in runs}
        row = {"T": T, "B": B, "D": D, "H": H, "K": K, "tokens": tokens, "times": times, "median": med, "peak": peaks}
        row["ratio"] = med["sqrt"] / med["none"]
        rows.append(row)
        print(
            f"T={T:<4} B={B:<3} D={D:<4} H={H:<5} K={K:<5}{' tok' if tokens else '    '}"
            f"  stored {1e3 * med['none']:8.2f} ms"
            f"  sqrt {1e3 * med['sqrt']:8.2f} ms  ratio {row['ratio']:.2f}  peak {peaks['none'] / 2**20:6.1f} → "
            f"{peaks['sqrt'] / 2**20:5.1f} MiB",
            flush=True,
        )
    ratios = [r["ratio"] for r in rows]
    print(f"recompute ÷ stored: median {np.median(ratios):.2f}, max {max(ratios):.2f}")
    if args.output:
        out = {"environment": environment([be]), "argv": sys.argv, "rows": rows}
        write_atomic(args.output, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
