"""Steadiness on a shared machine: each shape's forward+BPTT timed alone, then in two processes at once.

Two gpubptt processes sharing the cores should each take at most ~2× their time alone (2.5× is the
bar); threaded BLAS that spins on the small per-step GEMMs used to make it 5–19×. Each measurement
runs in fresh worker processes with every BLAS/OpenMP thread variable removed from their environment
(the default a user gets), over the same wall-clock window; a round is "alone" then "pair", and the
rounds repeat so that the spread shows how loaded the machine was. Per shape: the median time of one
``loss_and_grads`` alone and in the pair, and their ratio (each pair member's median over the alone
median of the same round; the worst member counts).

    python benchmarks/steady.py --out OUT_DIR      # writes OUT_DIR/steady.json; about 3 minutes

OUT_DIR defaults to a fresh folder under the system's temporary directory (never inside the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "GOTO_NUM_THREADS", "BLIS_NUM_THREADS")

# (cell, T, B, D, H, K, num_layers, bidirectional)
SHAPES = [
    ("gru", 32, 8, 64, 128, 64, 1, False),
    ("lstm", 64, 32, 128, 256, 256, 1, False),
    ("rnn", 32, 16, 64, 128, 64, 1, False),
    ("rnn", 64, 32, 128, 256, 256, 2, True),
    ("gru", 64, 32, 128, 256, 256, 2, True),
    ("rnn", 16, 128, 512, 1024, 1024, 1, False),
]


def worker(spec: dict) -> None:
    """Build the model, warm up, wait for the common start time, time calls for the window; print JSON."""
    import gpubptt

    cell, T, B, D, H, K, layers, bi = spec["shape"]
    rng = np.random.default_rng(0)
    be = gpubptt.get_backend("numpy")
    if spec["policy"] == "blas-default":  # the A/B baseline: leave the thread count to the BLAS itself
        be.blas_threads.enabled = False
    model = gpubptt.RNN(D, H, K, cell=cell, num_layers=layers, bidirectional=bi, backend=be, seed=0, bias=False)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    y = rng.integers(0, K, (T, B))
    for _ in range(2):
        model.loss_and_grads(x, y)
    while time.time() < spec["start"]:
        time.sleep(0.005)
    times = []
    end = spec["start"] + spec["seconds"]
    while time.time() < end or len(times) < 3:
        t = time.perf_counter()
        model.loss_and_grads(x, y)
        times.append(time.perf_counter() - t)
    print(json.dumps({"median_s": float(np.median(times)), "calls": len(times)}))


def run_workers(shape: tuple, n: int, seconds: float, policy: str) -> list[float]:
    """Start n workers on ``shape`` that time the same window; their median seconds per call."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    spec = {"shape": list(shape), "start": time.time() + 3.0, "seconds": seconds, "policy": policy}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"worker failed with exit code {p.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1])["median_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_out_option(ap)
    ap.add_argument("--rounds", type=int, default=3, help="alone-then-pair rounds per shape")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing window of each measurement")
    ap.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    ap.add_argument(
        "--compare-blas-default",
        action="store_true",
        help="also time each round with the thread count left to the BLAS (gpubptt's per-shape threads off)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    sys.path.insert(0, str(ROOT))
    from gpubptt.environment import environment

    out_dir = _report.out_dir(args.out)
    rows = []
    policies = ["per-shape", "blas-default"] if args.compare_blas_default else ["per-shape"]
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    for shape in shapes:
        cell, T, B, D, H, K, layers, bi = shape
        row = dict(cell=cell, T=T, B=B, D=D, H=H, K=K, num_layers=layers, bidirectional=bi)
        for policy in policies:
            rounds = []
            for _ in range(args.rounds):
                (alone,) = run_workers(shape, 1, args.seconds, policy)
                pair = run_workers(shape, 2, args.seconds, policy)
                rounds.append({"alone_s": alone, "pair_s": pair, "ratio": max(pair) / alone})
            ratios = [r["ratio"] for r in rounds]
            alone = float(np.median([r["alone_s"] for r in rounds]))
            summary = dict(alone_median_s=alone, ratio_median=float(np.median(ratios)))
            row[policy] = dict(rounds=rounds, **summary, ratio_min=min(ratios), ratio_max=max(ratios))
            print(
                f"{cell:<4} T={T:<3} B={B:<3} H={H:<4} K={K:<4} L={layers}{' bi' if bi else '   '} {policy:<12}"
                f" alone {alone * 1e3:8.2f} ms  pair/alone {summary['ratio_median']:.2f}"
                f" (range {min(ratios):.2f}–{max(ratios):.2f})",
                flush=True,
            )
        rows.append(row)
    result = {
        "schema": "gpubptt-steady/1",
        "command": " ".join(sys.argv),
        "environment": environment(),
        "thread_variables_removed": list(THREAD_VARS),
        "max_ratio": max(r["per-shape"]["ratio_median"] for r in rows),
        "rows": rows,
    }
    path = out_dir / "steady.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"worst pair/alone (median of rounds) {result['max_ratio']:.2f}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
