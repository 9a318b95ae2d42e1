"""Shared fixtures: ``be``/``xp`` run a test on every backend (CuPy under the ``gpu`` marker).

Also a summary of skipped tests by reason, one line each with its count, in place of pytest's line
per skipping test (``-rs``): dozens of CuPy skips read as one line on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

from gpubptt.backend import get_backend, numpy_backend
from gpubptt.backend._mkl import load_mkl
from gpubptt.errors import BackendUnavailableError

# CI=true selects a deterministic profile: the same examples on every run.
settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile("ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev")

pytest_plugins = ["pytester"]  # tests/test_build.py runs pytest on small generated suites


def skip_reasons(reports) -> Counter[str]:
    """How many tests skipped for each reason, from pytest's skip reports."""
    reasons: Counter[str] = Counter()
    for rep in reports:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    return reasons


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--require-gpu",
        action="store_true",
        help="fail when no selected test ran (every one skipped): make test-gpu on a machine without a GPU",
    )


def _nothing_ran(config, stats) -> bool:
    """--require-gpu and not one test passed or failed: every selected test skipped."""
    return config.getoption("--require-gpu") and not stats.get("passed") and not stats.get("failed")


def pytest_sessionfinish(session, exitstatus) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if exitstatus == 0 and reporter is not None and _nothing_ran(session.config, reporter.stats):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """One line per distinct skip reason, most frequent first: "66 skipped: cupy backend unavailable: ..."."""
    reasons = skip_reasons(terminalreporter.stats.get("skipped", []))
    if reasons:
        terminalreporter.write_sep("=", "skipped, by reason")
        for reason, n in reasons.most_common():
            terminalreporter.write_line(f"{n} skipped: {reason}")
    if _nothing_ran(config, terminalreporter.stats):
        terminalreporter.write_line("error: no GPU test ran (--require-gpu): every selected test skipped", red=True)


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


@pytest.fixture(params=["numpy", "mkl"])
def blas(request, monkeypatch):
    """The NumPy backend's GEMMs on NumPy's own BLAS (as under GPUBPTT_BLAS=numpy), then on MKL for every GEMM
    whatever its size (``MKL_MIN_FLOPS`` set to 0, so that tiny test shapes reach MKL and its packed weights);
    the MKL run skips, with the reason, where MKL is absent. For a few gradient tests: they run once per BLAS."""
    be = get_backend("numpy")
    if request.param == "numpy":
        monkeypatch.setattr(be, "mkl", None)
    else:
        mkl, why = load_mkl()
        if mkl is None:
            pytest.skip(f"MKL unavailable ({why}): pip install mkl")
        monkeypatch.setattr(be, "mkl", mkl)
        monkeypatch.setattr(numpy_backend, "MKL_MIN_FLOPS", 0)
    monkeypatch.setattr(be, "blas", request.param)
    return request.param


@pytest.fixture(params=["numpy", "numba"])
def jit(request, monkeypatch):
    """The gated cells' step kernels on the NumPy backend: their NumPy twins (as under GPUBPTT_JIT=numpy), then
    numba's compiled twins (``gpubptt.cells._jit``); the numba run skips, with the reason, where numba is absent.
    For the gated gradient tests: they run once per kind of step kernel."""
    from gpubptt.cells import _jit, gru, lstm

    be = get_backend("numpy")
    for cell in (gru, lstm):
        try:
            compiled = _jit.compile_kernels(*cell.JIT_KERNELS, choice=request.param)
        except BackendUnavailableError as exc:
            pytest.skip(f"numba unavailable ({exc}): pip install numba")
        monkeypatch.setattr(cell.kernels(be), "jit", compiled)
    return request.param


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
