"""(b) Time-series regression with the per-step MSE head: predict the next value of a noisy signal.

Each sequence is a sum of two sines with random frequencies and phases plus noise; at every step
the model reads x_t and predicts x_{t+1} (``head="mse"``, y (T, B, 1) floats). An LSTM trained with
Adam; prints the held-out MSE next to two baselines: predicting 0 and repeating the last value.

    python examples/timeseries_regression.py [--steps 300] [--T 40]
"""

from __future__ import annotations

import argparse

import numpy as np

import gpubptt
from gpubptt.training.optim import Adam


def make_batch(rng: np.random.Generator, T: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    """x (T, B, 1) the signal, y (T, B, 1) the signal one step later."""
    t = np.arange(T + 1)[:, None]
    f = rng.uniform(0.1, 0.4, size=(2, B))
    phase = rng.uniform(0, 2 * np.pi, size=(2, B))
    s = np.sin(f[0] * t + phase[0]) + 0.5 * np.sin(f[1] * t + phase[1]) + 0.05 * rng.normal(size=(T + 1, B))
    return s[:-1, :, None], s[1:, :, None]


def main(argv: list[str] | None = None) -> tuple[float, float, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--T", type=int, default=40)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(1, args.hidden, 1, cell="lstm", bias=True, init="torch", backend="numpy", seed=0)
    model.head = "mse"
    opt = Adam(model, lr=0.01)
    for _ in range(args.steps):
        x, y = make_batch(rng, args.T, 32)
        loss, grads = model.loss_and_grads(x.astype(np.float32), y.astype(np.float32), reduction="mean")
        opt.step(grads, loss=loss)
    x, y = make_batch(np.random.default_rng(1), args.T, 200)
    mse = float(model.loss(x.astype(np.float32), y.astype(np.float32), reduction="mean"))
    zero, repeat = float((y**2).mean()), float(((y - x) ** 2).mean())
    print(f"held-out MSE {mse:.4f}; predicting 0: {zero:.4f}; repeating the last value: {repeat:.4f}")
    return mse, zero, repeat


if __name__ == "__main__":
    main()
