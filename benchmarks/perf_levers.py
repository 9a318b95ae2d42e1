"""CPU speed levers for the gated cells, each an interleaved A/B in one process (issue 22).

Each lever times a baseline "A" (what the library does today) and a variant "B" in alternating
rounds, so that a loaded machine slows both alike; per lever the median of the per-round ratios B/A
with its quartiles, wall-clock and CPU time (``time.process_time``: the cycles this process got,
less sensitive to other processes than wall time). Ratio < 1: the variant is faster.

    threads_step     per-step GEMMs on 1 BLAS thread (A) or on all of them (B)
    threads_batched  the batched GEMMs (input projection, output layer, dW, dU) on all BLAS threads (A)
                     or on one (B)
    batch_halves     one recurrence's forward + BPTT over the whole batch (A), or over its two halves
                     at once in two Python threads, one BLAS thread each, each half with its own
                     buffers (B; rows are independent, so no barrier per step, only dW summed)
    directions       a 2-layer bidirectional model's ``loss_and_grads`` with each layer's two directions
                     one after the other (A: ``NumpyBackend.concurrent`` off) or at once in two Python
                     threads, one BLAS thread each (B: the default where the process may use ≥ 2 cores)

    python benchmarks/perf_levers.py OUT_DIR                     # OUT_DIR/perf-levers.json and .txt
    python benchmarks/perf_levers.py OUT_DIR --cells lstm --rounds 41 --levers directions

``batch_halves`` runs the cell's own ``run_forward``/``run_backward`` on buffers of its ``buffers``
(a prototype of a schedule the engine does not run); the others run whole ``loss_and_grads`` calls.
OUT_DIR defaults to a new folder under the system's temporary directory.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import gpubptt
import gpubptt.backend.numpy_backend as numpy_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report

LEVERS = ("threads_step", "threads_batched", "batch_halves", "directions")
SHAPE = (64, 32, 128, 256, 256)  # T, B, D, H, K: the gated rows of perf_gated.py where torch leads most


class Recurrence:
    """One recurrence's buffers for a (T, B) batch and its forward + BPTT through the cell's own loops."""

    def __init__(self, model, T: int, B: int, rng) -> None:
        cell, H, dt = model.cell, model.hidden_size, np.float32
        self.model, self.cell, self.be = model, cell, model.backend
        self.q = model.recurrence_params(model.recurrences[0])
        self.pre = rng.standard_normal((T, B, cell.gates * H)).astype(dt)
        self.work = np.empty_like(self.pre)
        self.S = np.zeros((T + 1, B, H), dtype=dt)
        self.G = np.empty((T, B, H), dtype=dt)
        self.G0 = rng.standard_normal((T, B, H)).astype(dt) * 0.1
        self.aux = cell.buffers(T, B, H, xp=np, dtype=dt)
        cell.load(self.aux, None)
        self.scratch = np.empty((B, H), dtype=dt)
        self.grads = {k: np.empty_like(v) for k, v in self.q.items()}
        if cell.extra_state:
            self.grads[cell.extra_state] = np.empty((B, H), dtype=dt)
        self.ds0 = np.empty((B, H), dtype=dt)

    def __call__(self) -> None:
        cell, be = self.cell, self.be
        cell.run_forward(self.pre, self.q, self.S, self.aux, be=be, scratch=self.scratch, step_kernels="auto")
        self.G[...] = self.G0
        cell.run_backward(
            self.G, self.q, self.S, self.aux, be=be, work=self.work, scratch=self.scratch, step_kernels="auto",
            truncate=None, lanes=None, grads=self.grads, ds0=self.ds0,
        )  # fmt: skip


def ab(a, b, rounds: int) -> dict:
    """Alternate a and b for ``rounds`` rounds; wall and CPU seconds of each, and the per-round ratios b/a."""
    for fn in (a, b):
        fn()
    out: dict = {"A": {"wall": [], "cpu": []}, "B": {"wall": [], "cpu": []}}
    for _ in range(rounds):
        for name, fn in (("A", a), ("B", b)):
            w, c = time.perf_counter(), time.process_time()
            fn()
            out[name]["cpu"].append(time.process_time() - c)
            out[name]["wall"].append(time.perf_counter() - w)
            time.sleep(0.02)
    for kind in ("wall", "cpu"):
        r = np.asarray(out["B"][kind]) / np.asarray(out["A"][kind])
        out[f"ratio_{kind}"] = {"median": float(np.median(r)), "q25": float(np.percentile(r, 25)),
                                "q75": float(np.percentile(r, 75))}  # fmt: skip
    return out


def levers(cell: str, rounds: int, which: set[str]) -> dict:
    T, B, D, H, K = SHAPE
    be = gpubptt.get_backend("numpy")
    threads = be.blas_threads
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, K, cell=cell, backend=be, seed=0, init="torch", bias=False)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    y = rng.integers(0, K, (T, B))
    most, threshold = threads.most, numpy_backend.BLAS_THREADED_FLOPS
    results = {}

    def with_settings(step_threaded: bool, batched_threads: int):
        def run() -> None:
            numpy_backend.BLAS_THREADED_FLOPS = 1 if step_threaded else threshold
            threads.most = batched_threads
            model.loss_and_grads(x, y)

        return run

    if "threads_step" in which:
        results["threads_step"] = ab(with_settings(False, most), with_settings(True, most), rounds)
    if "threads_batched" in which:
        results["threads_batched"] = ab(with_settings(False, most), with_settings(False, 1), rounds)
    numpy_backend.BLAS_THREADED_FLOPS, threads.most = threshold, most

    pool = ThreadPoolExecutor(2)
    full = Recurrence(model, T, B, rng)
    halves = [Recurrence(model, T, B // 2, rng) for _ in range(2)]

    def concurrently(a, b):
        def run() -> None:
            other = pool.submit(b)
            a()
            other.result()

        return run

    threads.most = 1  # one BLAS thread for every GEMM of both sides (dW too): the Python threads are the parallelism
    threads.use(1)
    if "batch_halves" in which:
        results["batch_halves"] = ab(full, concurrently(*halves), rounds)
    threads.most = most
    pool.shutdown()
    bi = gpubptt.RNN(D, H, K, cell=cell, num_layers=2, bidirectional=True, backend=be, seed=0, init="torch", bias=False)

    def directions(concurrent: bool):
        def run() -> None:
            be.concurrent = concurrent
            bi.loss_and_grads(x, y)

        return run

    if "directions" in which:
        results["directions"] = ab(directions(False), directions(True), rounds)
    be.concurrent = True
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_out_option(ap)
    ap.add_argument("--cells", default="lstm,gru", help="comma-separated cells (gru, lstm; rnn for the directions)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--levers", default=",".join(LEVERS), help="comma-separated levers (default: all)")
    args = ap.parse_args()
    be = gpubptt.get_backend("numpy")
    out, lines = {}, []
    for cell in args.cells.split(","):
        out[cell] = levers(cell, args.rounds, set(args.levers.split(",")))
        for name, r in out[cell].items():
            w, c = r["ratio_wall"], r["ratio_cpu"]
            lines.append(
                f"{cell:>4} {name:<16} B/A wall {w['median']:.2f} [{w['q25']:.2f}, {w['q75']:.2f}]"
                f"  cpu {c['median']:.2f} [{c['q25']:.2f}, {c['q75']:.2f}]"
                f"  (A {np.median(r['A']['wall']) * 1e3:.1f} ms, B {np.median(r['B']['wall']) * 1e3:.1f} ms)"
            )
            print(lines[-1], flush=True)
    T, B, D, H, K = SHAPE
    result = {"benchmark": "perf_levers", "command": " ".join(sys.argv), "shape": dict(T=T, B=B, D=D, H=H, K=K),
              "rounds": args.rounds, "blas": be.blas_threads.library, "blas_most_threads": be.blas_threads.most,
              "numpy": np.__version__, "python": platform.python_version(), "device": be.device,
              "levers": out}  # fmt: skip
    folder = _report.out_dir(args.out)
    path = folder / "perf-levers.json"
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
