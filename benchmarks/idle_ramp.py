"""What a pause costs the next call: memory speed after a pause, and a model's first call after it against back to back.

The headline ratio of ``perf_grid.py`` and ``perf_gated.py`` is each library's first call after a pause of
0.2 s. This script measures what such a pause does on its own, without torch in between:

- memory: ``passes`` consecutive sums over a ``--mib`` MiB float32 array (beyond the caches of one core), after
  ``--pause`` seconds in which the process only spins in Python (no memory traffic; the core stays busy, so
  this is not a core waking from idle), against the same passes with no pause; median per pass over rounds;
- a model: one ``loss_and_grads`` right after such a pause (and after a sleep of the same length) against the
  call after it, for gpubptt and, where it is installed, torch's ``nn.GRU`` / ``nn.LSTM`` + ``Linear`` on the same
  weights (the other library is not run between them).

    python benchmarks/idle_ramp.py --out OUT_DIR       # OUT_DIR/idle-ramp.json; about a minute

OUT_DIR defaults to a folder outside the repository (``_report.default_out_dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import gpubptt
from gpubptt.environment import environment

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report


def spin(seconds: float) -> None:
    """Busy for ``seconds`` in the Python interpreter: the core runs, memory sits idle."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def memory_passes(mib: int, passes: int, pause: float, rounds: int) -> dict:
    """Median seconds of each of ``passes`` consecutive sums over ``mib`` MiB, after a spin of ``pause`` s and
    after none."""
    a = np.ones(mib * 2**20 // 4, dtype=np.float32)
    a.sum()
    out = {}
    for name, wait in (("after_pause", pause), ("no_pause", 0.0)):
        table = []
        for _ in range(rounds):
            spin(wait)
            row = []
            for _ in range(passes):
                t = time.perf_counter()
                a.sum()
                row.append(time.perf_counter() - t)
            table.append(row)
        out[name] = [float(v) for v in np.median(np.array(table), axis=0)]
    return out


def first_and_next(fn, pause: float, rounds: int) -> dict:
    """Median seconds of fn's call right after a spin of ``pause`` s, after a sleep of ``pause`` s, and of the call
    that follows each (back to back)."""
    for _ in range(3):
        fn()
    out: dict[str, list[float]] = {"after_spin": [], "after_sleep": [], "next": []}
    for _ in range(rounds):
        for key, wait in (("after_spin", lambda: spin(pause)), ("after_sleep", lambda: time.sleep(pause))):
            wait()
            t = time.perf_counter()
            fn()
            out[key].append(time.perf_counter() - t)
            t = time.perf_counter()
            fn()
            out["next"].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _report.add_out_option(ap)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds of the pause (perf_gated.py's: 0.2)")
    ap.add_argument("--mib", type=int, default=25, help="size of the array the memory passes sum")
    ap.add_argument("--passes", type=int, default=12, help="consecutive memory passes after each pause")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--cell", default="lstm", choices=["gru", "lstm"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--shape", default="64,32,128,256,256", help="T,B,D,H,K")
    args = ap.parse_args()
    if args.pause <= 0 or min(args.mib, args.passes, args.rounds, args.layers) < 1:
        ap.error("--pause must be positive and --mib, --passes, --rounds, --layers at least 1")
    try:
        T, B, D, H, K = (int(v) for v in args.shape.split(","))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: expected five integers T,B,D,H,K")
    if min(T, B, D, H, K) < 1:
        ap.error(f"--shape {args.shape!r}: every size must be at least 1")
    folder = _report.out_dir(args.out)
    be = gpubptt.get_backend("numpy")  # before torch, as in perf_gated.py
    memory = memory_passes(args.mib, args.passes, args.pause, args.rounds)
    for key, what in (("after_pause", f"after a {args.pause} s pause"), ("no_pause", "with no pause")):
        print(f"{args.mib} MiB sum, ms per pass, {what}: " + " ".join(f"{s * 1e3:.2f}" for s in memory[key]))
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(D, H, K, cell=args.cell, num_layers=args.layers, backend=be, seed=0, init="torch", bias=False)
    x = rng.normal(size=(T, B, D)).astype(np.float32)
    y = rng.integers(0, K, (T, B))
    libraries = {"gpubptt": lambda: model.loss_and_grads(x, y)}
    try:
        from perf_gated import torch_side

        libraries["torch"] = torch_side(model, x, y, model.loss_and_grads(x, y)[1])[0]
    except ImportError:
        print("torch is not installed: gpubptt only", file=sys.stderr)
    calls = {}
    for name, fn in libraries.items():
        calls[name] = r = first_and_next(fn, args.pause, args.rounds)
        print(
            f"{name:<8} {args.cell} L={args.layers} T={T} B={B} H={H}: after the spin {r['after_spin'] * 1e3:.2f} ms, "
            f"after the sleep {r['after_sleep'] * 1e3:.2f} ms, back to back {r['next'] * 1e3:.2f} ms "
            f"(+{(r['after_sleep'] - r['next']) * 1e3:.2f} ms after the sleep)"
        )
        time.sleep(args.pause)
    result = {
        "schema": "gpubptt-idle-ramp/1",
        "command": " ".join(sys.argv),
        "environment": environment(),
        "pause_s": args.pause,
        "mib": args.mib,
        "memory_pass_s": memory,
        "model": dict(cell=args.cell, num_layers=args.layers, T=T, B=B, D=D, H=H, K=K),
        "calls_s": calls,
    }
    path = folder / "idle-ramp.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
