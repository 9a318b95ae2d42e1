"""The error of ``precision`` "fp32" / "tf32" / "bf16" against the float64 path, on the NumPy emulation.

Per cell and precision: the worst, over a few seeds (token and dense inputs alike), of the largest
normwise relative gradient error over the parameters, ‖g − g64‖ / ‖g64‖, and of the loss's relative
error, where g64 comes from a float64 copy of the same weights; then the largest relative gap between a
short SGD run's per-step loss at each precision and at fp32 (recalling the token two steps back).
NumPy rounds the GEMM operands exactly as the specification says, so these are the numbers a device's
tensor-core GEMMs are held to (tests/test_precision.py asserts the small shape's bounds with margin).

    python benchmarks/precision_error.py            # prints a Markdown table (about 10 s on 2 cores)
"""

from __future__ import annotations

import sys

import numpy as np

import gpubptt

SHAPES = {  # name: (T, B, D, H, K, layers, bidirectional, seeds)
    "T=12 B=4 H=16": (12, 4, 10, 16, 10, 1, False, 10),
    "T=32 B=16 H=128, 2 layers bidirectional": (32, 16, 64, 128, 64, 2, True, 3),
}


def errors(cell: str, precision: str, seed: int, shape: tuple) -> tuple[float, float]:
    T, B, D, H, K, layers, bi, _ = shape
    rng = np.random.default_rng(seed)
    model = gpubptt.RNN(D, H, K, cell=cell, backend="numpy", seed=seed, init="torch", precision=precision,
                        num_layers=layers, bidirectional=bi)  # fmt: skip
    ref = gpubptt.RNN.from_params(model.params, backend="numpy", dtype="float64", cell=cell)
    tokens = seed % 2 == 0
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    loss, g = model.loss_and_grads(x if tokens else x.astype(np.float32), y)
    loss64, g64 = ref.loss_and_grads(x, y)
    grad = max(float(np.linalg.norm(g[k] - g64[k]) / np.linalg.norm(g64[k])) for k in model.params)
    return grad, abs(float(loss) - float(loss64)) / abs(float(loss64))


def loss_curve(cell: str, precision: str, steps: int = 60) -> np.ndarray:
    rng = np.random.default_rng(0)
    lr = 0.5 if cell == "rnn" else 2.0
    model = gpubptt.RNN(8, 24, 8, cell=cell, backend="numpy", seed=1, init="torch", precision=precision)
    out = []
    for _ in range(steps):
        x = rng.integers(0, 8, size=(10, 8))
        y = np.roll(x, 2, axis=0)
        y[:2] = 0
        loss, grads = model.loss_and_grads(x, y, reduction="mean")
        out.append(float(loss))
        for k, p in model.params.items():
            p -= lr * grads[k]
    return np.array(out)


def main() -> int:
    print("| shape | cell | precision | gradient rel. error (max) | loss rel. error (max) |")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        for cell in ("rnn", "gru", "lstm"):
            for precision in ("fp32", "tf32", "bf16"):
                es = [errors(cell, precision, s, shape) for s in range(shape[-1])]
                grad, loss = max(e for e, _ in es), max(e for _, e in es)
                print(f"| {name} | {cell} | {precision} | {grad:.1e} | {loss:.1e} |", flush=True)
    print("\n| cell (fp32 loss, first → last of 60 SGD steps) | max relative gap to fp32: tf32 | bf16 |")
    print("|---|---|---|")
    for cell in ("rnn", "gru", "lstm"):
        ref = loss_curve(cell, "fp32")
        gaps = [float(np.max(np.abs(loss_curve(cell, p) - ref) / ref)) for p in ("tf32", "bf16")]
        print(f"| {cell} (loss {ref[0]:.2f} → {ref[-1]:.2f}) | {gaps[0]:.1e} | {gaps[1]:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
