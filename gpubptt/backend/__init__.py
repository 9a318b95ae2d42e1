"""Array backends: the one package that imports or names CuPy.

Everything above it is written once against ``backend.xp`` (NumPy or CuPy). A backend is a small
object (``base.Backend``): the host/device boundary (``asarray``, ``to_numpy``, ``synchronize``),
``matmul`` (cuBLAS called directly on CuPy, so it can be captured in a CUDA graph), the
deterministic token scatter-add, ``capture`` (a CUDA graph of a function, replayed in one launch)
and ``timer``; device backends also compile the kernels a cell brings (``elementwise``,
``raw_kernels``). CuPy is imported lazily, so a CPU-only install never touches it.

    >>> be = get_backend("numpy")
    >>> be.name, be.xp.__name__
    ('numpy', 'numpy')
"""

from __future__ import annotations

import os
import threading

from ..errors import BackendUnavailableError, InputError
from .base import Backend, TokenPlan, is_cupy_array, to_numpy
from .cupy_backend import INSTALL_HINT, make_cupy_backend
from .numpy_backend import ONEHOT_MAX_VOCAB, NumpyBackend

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "INSTALL_HINT",
    "ONEHOT_MAX_VOCAB",
    "Backend",
    "TokenPlan",
    "available_backends",
    "backend_of",
    "get_backend",
    "to_numpy",
]

BACKEND_NAMES = ("auto", "numpy", "cupy")
ENV_VAR = "GPUBPTT_BACKEND"

_CACHE: dict[str, Backend] = {}
_CACHE_LOCK = threading.Lock()  # two threads asking first get the same backend (one cuBLAS handle)


def get_backend(name: str | Backend | None = None) -> Backend:
    """Return the backend called ``name``: "numpy", "cupy" or "auto".

    ``None`` reads the ``GPUBPTT_BACKEND`` environment variable, else "auto" (CuPy when it imports
    and a CUDA device answers, else NumPy). Asking for "cupy" where it cannot run raises
    BackendUnavailableError; there is never a silent fallback.
    """
    if isinstance(name, Backend):
        return name
    if name is None:
        name = os.environ.get(ENV_VAR, "").strip() or "auto"
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise InputError(f"unknown backend {name!r}; expected one of {', '.join(BACKEND_NAMES)}")
    name = name.lower()
    if name == "auto":
        try:
            return get_backend("cupy")
        except BackendUnavailableError:
            return get_backend("numpy")
    with _CACHE_LOCK:
        if name not in _CACHE:
            _CACHE[name] = NumpyBackend() if name == "numpy" else make_cupy_backend()
        return _CACHE[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here, NumPy first."""
    names = ["numpy"]
    try:
        get_backend("cupy")
        names.append("cupy")
    except BackendUnavailableError:
        pass
    return names


def backend_of(a: object) -> Backend:
    """The backend whose arrays ``a`` is: CuPy for a CuPy array, else NumPy."""
    return get_backend("cupy" if is_cupy_array(a) else "numpy")
