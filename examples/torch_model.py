"""(c) A torch model around gpubptt: embedding → ``gpubptt.torch.Recurrent`` (an LSTM) → linear head.

Token sequences over a vocabulary of 12; the label is the marker token (1, 2 or 3) that occurs most
often in the sequence (ties broken by the smallest id). The recurrent layer is torch's ``nn.LSTM``
handed to ``Recurrent.from_module``: its forward and exact BPTT run in gpubptt (NumPy here, CuPy
for CUDA tensors), everything else is ordinary torch, trained with ``torch.optim.Adam``. Prints the
held-out accuracy (chance about 1/3).

    python examples/torch_model.py [--steps 300] [--T 40]
"""

from __future__ import annotations

import argparse

import torch

from gpubptt.torch import Recurrent

VOCAB, CLASSES = 12, 3


class Classifier(torch.nn.Module):
    """tokens (T, B) → logits (B, 3): embedding, gpubptt's LSTM, a linear layer on the last h."""

    def __init__(self, hidden: int = 32, recompute: int | str | None = None) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.rnn = Recurrent.from_module(torch.nn.LSTM(16, hidden), recompute=recompute)
        self.out = torch.nn.Linear(hidden, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.rnn(self.embed(tokens))
        return self.out(h_n[-1])


def make_batch(g: torch.Generator, T: int, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (T, B), labels (B,): the marker 1, 2 or 3 seen most often."""
    tokens = torch.randint(0, VOCAB, (T, B), generator=g)
    counts = torch.stack([(tokens == m).sum(0) for m in (1, 2, 3)], dim=1)  # (B, 3)
    return tokens, counts.argmax(dim=1)


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--T", type=int, default=40)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        tokens, labels = make_batch(g, args.T, 32)
        loss = torch.nn.functional.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tokens, labels = make_batch(torch.Generator().manual_seed(1), args.T, 500)
    with torch.no_grad():
        accuracy = (model(tokens).argmax(1) == labels).float().mean().item()
    print(f"held-out accuracy {accuracy:.3f} (chance about 0.333) after {args.steps} steps")
    return accuracy


if __name__ == "__main__":
    main()
