"""Overhead of ``gpubptt.torch.Recurrent`` over calling gpubptt's pullback directly, on the CPU.

For each dense shape of the performance grid (``perf_grid.GRID``, the rnn cell, float32): one
forward+backward through ``Recurrent`` (torch tensors in and out, autograd, DLPack) against
``model.vjp`` + ``pullback`` on NumPy arrays with the same weights and upstream gradient. Timed
interleaved (the order alternating per round), best of 3 per round, median over the rounds of the
per-round ratio, with its interquartile range. Prints one line per shape.

``--torch-threads`` sets ``torch.set_num_threads`` (default: torch's own choice). On a small
machine torch's idle OpenMP workers spin between its ops and take cores from the BLAS that gpubptt
runs in between; one torch thread shows the wrapper's own cost.

    python benchmarks/torch_overhead.py [--rounds 20] [--shapes 3] [--torch-threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import gpubptt
from gpubptt.torch import Recurrent

GRID = [(32, 16, 64, 128), (64, 32, 128, 256), (64, 32, 64, 256), (32, 32, 64, 256), (64, 64, 256, 512)]


def best_of(fn, n: int = 3) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--shapes", type=int, default=len(GRID))
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f"torch threads {torch.get_num_threads()}")
    for T, B, D, H in GRID[: args.shapes]:
        measure(T, B, D, H, args.rounds)


def measure(T: int, B: int, D: int, H: int, rounds: int) -> None:
    """One shape: print direct and wrapped medians and the ratio."""
    model = gpubptt.RNN(D, H, 1, backend="numpy", seed=0, bias=False)
    rec = Recurrent(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    dY = rng.normal(size=(T, B, H)).astype(np.float32)
    xt, dYt = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dY)

    def direct() -> None:
        _, pullback = model.vjp(x)
        pullback(dY)

    def wrapped() -> None:
        out, _ = rec(xt)
        out.backward(dYt)

    direct(), wrapped()  # warm-up
    ratios, t_direct, t_wrapped = [], [], []
    for r in range(rounds):
        if r % 2:
            a = best_of(direct)
            b = best_of(wrapped)
        else:
            b = best_of(wrapped)
            a = best_of(direct)
        t_direct.append(a)
        t_wrapped.append(b)
        ratios.append(b / a)
    q = np.percentile(ratios, [25, 50, 75])
    print(
        f"T={T} B={B} D={D} H={H}: direct {np.median(t_direct) * 1e3:.2f} ms, Recurrent "
        f"{np.median(t_wrapped) * 1e3:.2f} ms, ratio {q[1]:.3f} (IQR {q[0]:.3f}–{q[2]:.3f})"
    )


if __name__ == "__main__":
    main()
