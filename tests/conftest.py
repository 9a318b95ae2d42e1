"""Shared fixtures: ``be``/``xp`` run a test on every backend (CuPy under the ``gpu`` marker)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from gpubptt.backend import get_backend
from gpubptt.errors import BackendUnavailableError

# CI=true selects a deterministic profile: the same examples on every run.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")


def cupy_unavailable_reason() -> str | None:
    """Why the CuPy backend cannot run here, or None when it can."""
    try:
        get_backend("cupy")
    except BackendUnavailableError as exc:
        return str(exc)
    return None


BACKENDS = [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def be(request):
    """Each available backend; CuPy skips with the reason it cannot run."""
    if request.param == "cupy":
        reason = cupy_unavailable_reason()
        if reason:
            pytest.skip(f"cupy backend unavailable: {reason}")
    return get_backend(request.param)


@pytest.fixture
def xp(be):
    """The array module of each available backend."""
    return be.xp


def pytest_collection_modifyitems(items):
    """Every test that runs on CuPy carries the gpu marker, so ``-m gpu`` selects all of them."""
    for item in items:
        if "cupy_be" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def cupy_be():
    """The CuPy backend, or a skip that says why it cannot run here."""
    reason = cupy_unavailable_reason()
    if reason:
        pytest.skip(f"cupy backend unavailable: {reason}")
    return get_backend("cupy")
