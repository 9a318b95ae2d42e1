"""The environment a measurement ran in: machine, library versions, BLAS build, thread counts, devices."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import numpy as np

from .backend import Backend

__all__ = ["environment"]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _blas_info() -> dict[str, Any]:
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]  # numpy ≥ 2: returns, prints nothing
        blas = deps.get("blas", {})
        return {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k) is not None}
    except Exception:  # older numpy: no dict mode
        return {}


def _threads_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
    try:
        from threadpoolctl import threadpool_info  # optional: only when the user has it
    except ImportError:
        return info
    info["threadpools"] = [
        {k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version")} for p in threadpool_info()
    ]
    return info


def environment(backends: Sequence[Backend] = ()) -> dict[str, Any]:
    """Machine, library versions, BLAS build and thread counts, and each backend's device."""
    from . import __version__

    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "python": platform.python_version(),
        "versions": {
            "gpubptt": __version__,
            "numpy": np.__version__,
            **{dist: _version(dist) for dist in ("typer", "rich", "matplotlib", "torch")},
        },
        "blas": _blas_info(),
        "threads": _threads_info(),
        "backends": [
            {
                "name": be.name,
                "device": be.device,
                "library": be.xp.__name__,
                "version": be.xp.__version__,
                "gemm": be.blas_library,
            }
            for be in backends
        ],
    }
