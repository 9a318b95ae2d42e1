"""(a) Sequence classification with the last-step head: which of three input channels summed to the most?

Each sequence has its own length (5 to T steps) of 3-channel noise with a small bias on one channel;
the label is the channel whose sum over the sequence's own steps is largest. The answer needs the
whole sequence (a sum that one step cannot give), read at each sequence's own last valid step:
``head="last_softmax"`` with ``lengths``. A GRU, trained with Adam on fresh batches; prints the
held-out accuracy (chance: 1/3).

    python examples/sequence_classification.py [--steps 300] [--T 30]
"""

from __future__ import annotations

import argparse

import numpy as np

import gpubptt
from gpubptt.training.optim import Adam


def make_batch(rng: np.random.Generator, T: int, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, B, 3), labels (B,), lengths (B,): the channel with the largest sum over each sequence's steps."""
    lengths = rng.integers(5, T + 1, size=B)
    x = rng.normal(size=(T, B, 3)) + 0.3 * np.eye(3)[rng.integers(0, 3, size=B)][None]
    valid = np.arange(T)[:, None] < lengths[None, :]
    x *= valid[:, :, None]  # padded steps hold zeros (they are never read)
    return x, x.sum(axis=0).argmax(axis=1), lengths


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--T", type=int, default=30)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args(argv)
    if args.T < 5:  # each sequence is 5 to T steps long
        p.error(f"--T must be at least 5 (the shortest sequence), got {args.T}")
    if args.steps < 1 or args.hidden < 1:
        p.error(f"--steps and --hidden must be at least 1, got {args.steps} and {args.hidden}")
    rng = np.random.default_rng(0)
    model = gpubptt.RNN(3, args.hidden, 3, cell="gru", bias=True, init="torch", backend="numpy", seed=0)
    model.head = "last_softmax"
    opt = Adam(model, lr=0.01)
    for _ in range(args.steps):
        x, y, lengths = make_batch(rng, args.T, 32)
        loss, grads = model.loss_and_grads(x.astype(np.float32), y, lengths=lengths, reduction="mean")
        opt.step(grads, loss=loss)
    x, y, lengths = make_batch(np.random.default_rng(1), args.T, 500)
    logits = model.forward(x.astype(np.float32), lengths=lengths).logits  # (B, K): each sequence's last step
    accuracy = float((logits.argmax(axis=1) == y).mean())
    print(f"held-out accuracy {accuracy:.3f} (chance 0.333) after {args.steps} steps")
    return accuracy


if __name__ == "__main__":
    main()
