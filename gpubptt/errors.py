"""Exceptions raised by gpubptt.

Bad input is reported before any work is done, with a message that names what was wrong and what
was expected. Every input error is a ``ValueError`` or ``TypeError`` so callers can catch the
standard types; the subclasses let them be more precise.
"""

from __future__ import annotations

__all__ = [
    "BackendMismatchError",
    "BackendUnavailableError",
    "CheckpointError",
    "InputError",
    "InputTypeError",
    "ShapeError",
]


class InputError(ValueError):
    """An argument has a wrong value: out of range, non-finite, unknown name."""


class ShapeError(InputError):
    """An array has the wrong number of dimensions or the wrong shape."""


class InputTypeError(TypeError):
    """An argument has the wrong type or dtype (e.g. float token ids, int dense inputs)."""


class BackendMismatchError(InputTypeError):
    """An array lives on another backend than the model (NumPy array given to a CuPy model...)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (CuPy missing, no CUDA device, driver error)."""


class CheckpointError(InputError):
    """A checkpoint file is missing, truncated, corrupt, or does not describe a valid model."""
