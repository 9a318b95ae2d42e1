"""What ``gpubptt bench`` measures: ``BenchConfig`` (the sweeps, the model and the reference compared),
checked when it is made, and the tolerance a reference's gradients must meet."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backend.precision import PRECISIONS
from ..cells import NONLINEARITIES, cell_class, cell_names, make_cell

__all__ = ["COMPARES", "GRAD_TOL", "INPUTS", "PRECISION_GRAD_TOL", "BenchConfig"]

INPUTS = ("tokens", "dense")
COMPARES = ("none", "torch", "naive")
#: Gradient agreement threshold (normwise max relative error) of a reference implementation, by dtype.
GRAD_TOL = {"float32": 1e-3, "float64": 1e-9}
#: The same for float32 models of a reduced ``precision``, against a reference at the matching setting (torch:
#: TF32 matmuls, bf16 autocast): each side errs by up to ~1.5 units of the operands' roundoff (tf32 2^−11, bf16
#: 2^−8, measured against float64 in tests/test_precision.py), in different places.
PRECISION_GRAD_TOL = {"tf32": 1e-2, "bf16": 5e-2}


@dataclass
class BenchConfig:
    """What to measure.

    backends: names ("numpy", "cupy", "auto"); seq_lens: the T sweep (at fixed_H); hidden_sizes:
    the H sweep (at fixed_T). fixed_T / fixed_H default to the middle of the other sweep's list.
    input "tokens" (x (T, B) ids, D = vocabulary) or "dense" (x (T, B, D) floats); K outputs.
    """

    backends: list[str] = field(default_factory=lambda: ["auto"])
    seq_lens: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 512])
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    batch: int = 64
    input: str = "tokens"
    D: int = 256
    K: int = 256
    dtype: str = "float32"
    warmup: int = 2
    repeats: int = 10
    seed: int = 0
    compare: str = "none"
    fixed_T: int | None = None
    fixed_H: int | None = None
    num_layers: int = 1
    bidirectional: bool = False
    #: φ of a cell that takes one (None: the cell's own default, tanh for rnn, relu for indrnn); "tanh" for others
    nonlinearity: str | None = None
    #: the recurrent cell: "rnn", "gru" or "lstm" (torch compared as nn.RNN, nn.GRU, nn.LSTM)
    cell: str = "rnn"
    #: the model's GEMM precision: "fp32", "tf32" or "bf16" (float32 only); torch runs the matching setting
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"input must be one of {', '.join(INPUTS)}, got {self.input!r}")
        if self.compare not in COMPARES:
            raise ValueError(f"compare must be one of {', '.join(COMPARES)}, got {self.compare!r}")
        if self.cell not in cell_names():
            raise ValueError(f"cell must be one of {', '.join(cell_names())}, got {self.cell!r}")
        if self.compare == "torch" and cell_class(self.cell).torch_module is None:
            raise ValueError(f"compare 'torch' needs a cell torch has a module for; torch.nn has no {self.cell}")
        if self.cell != cell_names()[0] and self.compare == "naive":
            raise ValueError("compare 'naive' is the textbook tanh RNN: it compares the rnn cell only")
        if self.dtype not in GRAD_TOL:
            raise ValueError(f"dtype must be one of {', '.join(GRAD_TOL)}, got {self.dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ValueError(f"precision {self.precision!r} needs dtype float32, got {self.dtype!r}")
        if self.precision != "fp32" and self.compare == "naive":
            raise ValueError("compare 'naive' is float32 NumPy code: it compares precision 'fp32' only")
        if not self.seq_lens or not self.hidden_sizes:
            raise ValueError("seq_lens and hidden_sizes must each hold at least one size")
        for name, v in [("batch", self.batch), ("D", self.D), ("K", self.K), ("repeats", self.repeats)]:
            if v < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be ≥ 0, got {self.warmup}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1, got {self.num_layers}")
        takes = cell_class(self.cell).takes_nonlinearity
        if self.nonlinearity is None:  # the cell's own default, as RNN(cell=...) builds it; a gated cell keeps "tanh"
            self.nonlinearity = make_cell(self.cell, None).nonlinearity if takes else "tanh"
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {', '.join(NONLINEARITIES)}, got {self.nonlinearity!r}")
        if not takes and self.nonlinearity != "tanh":  # a GRU or LSTM is never labelled relu
            raise ValueError(
                f"nonlinearity applies to the cells that take one (rnn, indrnn), got {self.nonlinearity!r} with "
                f"{self.cell!r}"
            )
        if self.compare == "naive" and self.nonlinearity != "tanh":
            raise ValueError(
                f"compare 'naive' is the textbook tanh RNN: it compares nonlinearity 'tanh' only, got "
                f"{self.nonlinearity!r}"
            )
        if self.compare == "naive" and (self.num_layers > 1 or self.bidirectional):
            raise ValueError("compare 'naive' times the one-layer textbook code: it needs num_layers 1, one direction")
        if min(self.seq_lens) < 1 or min(self.hidden_sizes) < 1:
            raise ValueError(f"sizes must be ≥ 1, got seq_lens={self.seq_lens}, hidden_sizes={self.hidden_sizes}")
        if self.fixed_T is None:
            self.fixed_T = sorted(self.seq_lens)[(len(self.seq_lens) - 1) // 2]
        if self.fixed_H is None:
            self.fixed_H = sorted(self.hidden_sizes)[(len(self.hidden_sizes) - 1) // 2]

    @property
    def grad_tol(self) -> float:
        """The gradient agreement a reference must meet: by dtype, or by precision below fp32."""
        return GRAD_TOL[self.dtype] if self.precision == "fp32" else PRECISION_GRAD_TOL[self.precision]

    @property
    def tokens(self) -> bool:
        """Whether inputs are one-hot token ids."""
        return self.input == "tokens"

    @property
    def dirs(self) -> int:
        """2 for bidirectional models, else 1."""
        return 2 if self.bidirectional else 1
