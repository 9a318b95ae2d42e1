"""What the package ships beside its modules: the typing marker and the CUDA sources, as package data."""

from __future__ import annotations

from pathlib import Path

import pytest

import gpubptt

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11

ROOT = Path(__file__).resolve().parent.parent


def test_py_typed_marker_exists_and_is_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["gpubptt"]
    assert (Path(gpubptt.__file__).parent / "py.typed").is_file()
    assert "*.cu" in package_data["gpubptt.cells"]
