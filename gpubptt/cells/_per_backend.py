"""One object per backend, built on first use: what each cell keeps of its kernels (thread-safe)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

K = TypeVar("K")

__all__ = ["PerBackend"]


class PerBackend(Generic[K]):
    """``cache(be)``: the object ``build(be)`` made for backend ``be``, built once (a new backend object
    with a recycled id gets its own)."""

    def __init__(self, build: Callable[[Any], K], what: str) -> None:
        self._build, self._cache, self._lock = build, {}, threading.Lock()
        self.__doc__ = f"The {what} of backend ``be`` (built once per backend)."

    def __call__(self, be: Any) -> K:
        with self._lock:
            entry = self._cache.get(id(be))
            if entry is None or entry[0] is not be:
                entry = self._cache[id(be)] = (be, self._build(be))
            return entry[1]
