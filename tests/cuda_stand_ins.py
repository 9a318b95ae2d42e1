"""Stand-ins for CuPy's device arrays on the host, for the tests of the CuPy backend's host side."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np


class DevArray(np.ndarray):
    """A host array that answers ``.data.ptr`` as a CuPy array does (views keep the class)."""

    @property
    def data(self):  # type: ignore[override]
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])
