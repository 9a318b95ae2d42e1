"""Backend selection and the fused kernels against their plain definitions."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import gpubptt
from gpubptt import backend as backend_mod


@pytest.fixture
def no_cupy(monkeypatch):
    """Pretend CuPy is not installed (whatever this machine has)."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backend_mod, "_CACHE", {})


def test_cupy_unavailable_says_why_and_how_to_install(no_cupy):
    with pytest.raises(gpubptt.BackendUnavailableError) as info:
        gpubptt.get_backend("cupy")
    msg = str(info.value)
    assert "not installed" in msg and "pip install cupy-cuda12x" in msg and "cupy-cuda13x" in msg
    assert "gpubptt[" not in msg  # gpubptt is installed from its source folder, not by name from an index


def test_auto_falls_back_to_numpy_only_for_auto(no_cupy, monkeypatch):
    assert gpubptt.get_backend("auto").name == "numpy"
    monkeypatch.setenv("GPUBPTT_BACKEND", "cupy")
    with pytest.raises(gpubptt.BackendUnavailableError):
        gpubptt.get_backend()
    with pytest.raises(gpubptt.BackendUnavailableError):
        gpubptt.RNN(3, 3, 3, backend="cupy")


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("GPUBPTT_BACKEND", "numpy")
    assert gpubptt.get_backend().name == "numpy"
    assert gpubptt.RNN(3, 4, 5, backend=None).backend.name == "numpy"


@pytest.mark.parametrize("name", ["torch", "", "gpu", 3])
def test_unknown_backend_is_a_value_error(name):
    with pytest.raises(gpubptt.InputError, match="unknown backend"):
        gpubptt.get_backend(name)


def test_backend_exposes_its_interface(be):
    assert be.name in ("numpy", "cupy") and isinstance(be.device, str) and be.device
    a = be.asarray([1.0, 2.0])
    assert isinstance(a, be.xp.ndarray)
    be.synchronize()
    np.testing.assert_array_equal(be.to_numpy(a), [1.0, 2.0])


def test_host_staging_round_trips_a_buffer_and_backend_of_names_its_backend(be):
    # what the MPI communicator stages a device buffer through (pinned on CuPy): to the host and back
    a = be.asarray(np.arange(6.0).reshape(2, 3))
    assert backend_mod.backend_of(a) is be
    host = be.empty_pinned(a.shape, a.dtype)
    assert isinstance(host, np.ndarray) and host.shape == (2, 3) and host.dtype == a.dtype
    be.synchronize()
    be.copy_to_host(a, host)
    np.testing.assert_array_equal(host, np.arange(6.0).reshape(2, 3))
    host *= -1
    be.copy_from_host(host, a)
    np.testing.assert_array_equal(be.to_numpy(a), -np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("D", [9, 2000])  # a one-hot GEMM on NumPy for small vocabularies, segment sums above
def test_token_scatter_add_matches_add_at_and_is_deterministic(be, xp, D):
    rng = np.random.default_rng(1)
    H, N = 5, 200
    ids = rng.integers(0, D - 2, size=N)  # the last ids never appear
    rows = rng.normal(size=(N, H))
    want = np.zeros((D, H))
    np.add.at(want, ids, rows)
    results = []
    for _ in range(2):
        dUT = xp.zeros((D, H))
        plan = be.token_plan(be.asarray(ids), D)
        be.token_scatter_add(dUT, plan, be.asarray(rows))
        results.append(be.to_numpy(dUT))
    np.testing.assert_allclose(results[0], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(results[0], results[1])


def test_peak_bytes_counts_what_a_call_holds_at_once(be):
    xp = be.xp

    def work():
        a = xp.ones(1 << 20, dtype=xp.float64)  # 8 MiB
        b = xp.ones(1 << 19, dtype=xp.float64)  # 4 MiB while a is alive
        del a, b
        c = xp.ones(1 << 18, dtype=xp.float64)  # 2 MiB after both are gone
        del c

    peak = be.peak_bytes(work)
    assert 12 << 20 <= peak <= (12 << 20) + (1 << 20)
