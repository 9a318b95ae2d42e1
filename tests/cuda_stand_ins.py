"""Stand-ins for CuPy's device arrays on the host, for the tests of the CuPy backend's host side."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


class DevArray(np.ndarray):
    """A host array that answers ``.data.ptr`` as a CuPy array does (views keep the class)."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])


class Devices:
    """CuPy's ``cuda.Device`` over stand-in devices: ``Device()`` is the current one (``.id``); ``with Device(i):``
    makes device i current and puts the previous one back after; ``current`` is the current device's id."""

    def __init__(self) -> None:
        self.current = 0

    def __call__(self, device: int | None = None) -> SimpleNamespace:
        devices = self
        chosen = self.current if device is None else device

        class Device(SimpleNamespace):
            def __enter__(self):
                self.previous = devices.current
                devices.current = chosen

            def __exit__(self, *exc):
                devices.current = self.previous

        return Device(id=chosen)
