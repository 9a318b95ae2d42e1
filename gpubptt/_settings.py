"""A model's settings, mixed into ``RNN``: its sizes and cell read from the architecture (``model.config``),
the GEMMs' operand precision, a runtime choice like the backend, and the checked run settings (dropout,
batch_first, use_graphs)."""

from __future__ import annotations

from typing import Any

from .backend.precision import check_precision
from .validation import cell_option, check_bool, check_dropout

__all__ = ["Settings"]


class Settings:
    """Read-only sizes (``input_size``, ``hidden_size``, …, ``num_states``) and the settable, checked ``precision``,
    ``dropout``, ``batch_first`` and ``use_graphs`` (mixed into ``RNN``)."""

    @property
    def use_graphs(self) -> bool:
        """On CuPy, record forward+BPTT once per shape as a CUDA graph and replay it (no effect on NumPy); a bool
        (checked)."""
        return self._use_graphs

    @use_graphs.setter
    def use_graphs(self, value: Any) -> None:
        self._use_graphs = check_bool(value, "use_graphs")

    @property
    def batch_first(self) -> bool:
        """As torch's: x (B, T, …), per-step targets (B, T[, K]) and per-step outputs and states (B, T, …) with the
        batch first (views where possible); s0, lengths and final states are unchanged. Set it to a bool (checked)."""
        return self._batch_first

    @batch_first.setter
    def batch_first(self, value: Any) -> None:
        self._batch_first = check_bool(value, "batch_first")

    @property
    def dropout(self) -> float:
        """p of the inverted dropout between layers (see the class); set it to any number in [0, 1) (checked)."""
        return self._dropout

    @dropout.setter
    def dropout(self, p: Any) -> None:
        self._dropout = check_dropout(p)

    @property
    def precision(self) -> str:
        """The GEMMs' operand precision: "fp32" (float32 GEMMs), "tf32" or "bf16" (operands rounded to
        nearest even, products accumulated in float32; parameters, cell state, gate math and softmax stay
        float32; ``gpubptt.backend.precision``). Set it on a float32 model; float64 models run "fp32" only.
        On CuPy, tf32/bf16 steps run as cuBLAS GEMMs (``step_kernels`` "auto" means "cublas" then)."""
        return self.backend.precision

    @precision.setter
    def precision(self, value: str) -> None:
        value = check_precision(value, self.dtype)
        with self._lock:  # cached workspaces (and graphs) ran the other precision: rebuilt at the next call
            self.backend = self.backend.with_precision(value)
            self._workspaces.clear()
            self._spares.clear()

    @property
    def num_directions(self) -> int:
        """2 for a bidirectional model, else 1."""
        return 2 if self.bidirectional else 1

    # -- sizes --------------------------------------------------------------------------------
    @property
    def nonlinearity(self) -> str | None:
        """φ of the rnn cell's recurrence: "tanh" or "relu"; None for the gated cells."""
        return self.cell.nonlinearity

    @property
    def cell_name(self) -> str:
        """The ``cell`` option: "rnn", "gru" or "lstm"."""
        return cell_option(self.cell)

    @property
    def input_size(self) -> int:
        """D."""
        return self.config.input_size

    @property
    def hidden_size(self) -> int:
        """H."""
        return self.config.hidden_size

    @property
    def output_size(self) -> int:
        """K."""
        return self.config.output_size

    @property
    def bias(self) -> bool:
        """Whether the model has biases b and c."""
        return self.config.bias

    @property
    def num_states(self) -> int:
        """L·dirs: the recurrences, the rows of s0 and of the final state."""
        return len(self.recurrences)
