"""Recurrent cells: each owns its parameter shapes, its forward and backward recurrences, its step
Jacobian factors and its kernels (NumPy twins, CUDA sources as package data). The engine that runs a
cell over time knows none of a cell's math.
"""

from __future__ import annotations

from .elman import NONLINEARITIES, STEP_KERNELS, ElmanCell

__all__ = ["NONLINEARITIES", "STEP_KERNELS", "ElmanCell"]
