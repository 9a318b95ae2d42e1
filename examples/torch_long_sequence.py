"""(d) The torch model of example (c) on a sequence too long for torch's own ``nn.LSTM`` in a memory budget.

One forward+backward of embedding → LSTM → linear over T steps, twice, each in a fresh process:
with torch's ``nn.LSTM`` (which keeps every step's gates and states for its backward pass), and
with ``gpubptt.torch.Recurrent(recompute="sqrt")`` (which keeps the states at √T segment
boundaries and recomputes each segment in the backward pass; the output (T, B, H) that the module
returns is still held, as torch's interface asks). The peak is the largest growth of the process's
resident set during that call over its size just before (sampled every millisecond from
/proc/self/statm, Linux), after a small warm-up call, so both libraries' allocations, torch's and
NumPy's, are counted the same way. Prints both peaks and whether each fits ``--budget-mb``; the
gradients of the two agree (checked on a short sequence first).

    python examples/torch_long_sequence.py [--T 20000] [--budget-mb 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading

import torch

from gpubptt.torch import Recurrent

B, EMBED, HIDDEN, VOCAB = 4, 16, 64, 12


def build(which: str) -> torch.nn.Module:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(EMBED, HIDDEN)
    rnn = lstm if which == "torch" else Recurrent.from_module(lstm, recompute="sqrt")
    return torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(VOCAB, EMBED), "rnn": rnn, "out": torch.nn.Linear(HIDDEN, 3)}
    )


def step(model: torch.nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    """One forward+backward (a loss on the last step's h); returns the gradients."""
    _, (h_n, _) = model["rnn"](model["embed"](tokens))
    loss = model["out"](h_n[-1]).logsumexp(1).sum()
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def rss() -> int:
    """This process's resident set in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb(which: str, T: int) -> float:
    """MB by which this process's resident set grows at most during one call over T steps."""
    model = build(which)
    step(model, torch.randint(0, VOCAB, (50, B)))  # warm-up: lazy initialisation is not the call's memory
    tokens = torch.randint(0, VOCAB, (T, B), generator=torch.Generator().manual_seed(0))
    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step(model, tokens)
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak[0], rss()) - before) / 2**20


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, default=20000)
    p.add_argument("--budget-mb", type=float, default=100.0)
    p.add_argument("--measure", choices=["torch", "gpubptt"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.T < 1 or not args.budget_mb > 0:
        p.error(f"--T must be at least 1 and --budget-mb above 0, got {args.T} and {args.budget_mb}")
    if args.measure:  # the child process: one measurement, printed
        print(peak_mb(args.measure, args.T))
        return {}
    short = torch.randint(0, VOCAB, (64, B), generator=torch.Generator().manual_seed(2))
    for a, b in zip(step(build("torch"), short), step(build("gpubptt"), short), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32: the same gradients
    peaks = {}
    for which in ("torch", "gpubptt"):
        cmd = [sys.executable, __file__, "--measure", which, "--T", str(args.T)]
        peaks[which] = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    for which, label in (("torch", "torch nn.LSTM"), ("gpubptt", 'gpubptt Recurrent(recompute="sqrt")')):
        fits = "fits" if peaks[which] <= args.budget_mb else "does not fit"
        print(f"T={args.T}: {label} peak {peaks[which]:.1f} MB, {fits} in {args.budget_mb:g} MB")
    return peaks


if __name__ == "__main__":
    main()
