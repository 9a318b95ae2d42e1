"""The test run's own report: skips summed up by reason, and the closing line CI reads left as pytest writes it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _addopts() -> list[str]:
    """The pytest options of pyproject.toml (read with a pattern: tomllib needs Python 3.11)."""
    text = (ROOT / "pyproject.toml").read_text()
    return shlex.split(re.search(r'^addopts\s*=\s*"([^"]*)"', text, re.MULTILINE).group(1))


def test_skips_are_summed_up_one_line_per_reason_and_the_closing_line_stays(pytester):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(
        test_few="""
        import pytest

        @pytest.mark.parametrize("i", range(3))
        def test_needs_a_gpu(i):
            pytest.skip("cupy backend unavailable: no GPU here")

        def test_needs_torch():
            pytest.skip("could not import 'torch'")

        def test_runs():
            pass
        """
    )
    result = pytester.runpytest("-q", *_addopts())
    result.assert_outcomes(passed=1, skipped=4)
    out = result.stdout.lines
    assert "3 skipped: cupy backend unavailable: no GPU here" in out
    assert "1 skipped: could not import 'torch'" in out
    assert not [line for line in out if line.startswith("SKIPPED")]  # no line per skipping test
    assert re.fullmatch(r"1 passed, 4 skipped in [\d.]+s", out[-1])  # the closing line stays last, as pytest writes it


def test_require_gpu_fails_a_run_in_which_every_test_skipped_and_only_then(pytester):
    """make test-gpu passes --require-gpu: on a machine where every GPU test skips it must fail, saying so;
    without the flag (make test, CPU-only CI) the same skips pass, and one test that ran is enough."""
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(
        test_gpu="""
        import pytest

        def test_needs_a_gpu():
            pytest.skip("cupy backend unavailable: no GPU here")
        """
    )
    result = pytester.runpytest("-q", "--require-gpu")
    assert result.ret == 1
    assert "error: no GPU test ran (--require-gpu): every selected test skipped" in result.stdout.lines
    assert pytester.runpytest("-q").ret == 0
    pytester.makepyfile(test_ran="def test_runs():\n    pass\n")
    assert pytester.runpytest("-q", "--require-gpu").ret == 0


def test_make_test_gpu_requires_a_gpu_test_to_run_and_make_test_does_not():
    text = (ROOT / "Makefile").read_text()
    gpu = re.search(r"^test-gpu:.*\n\t(.*)$", text, re.MULTILINE).group(1)
    cpu = re.search(r"^test:.*\n\t(.*)$", text, re.MULTILINE).group(1)
    assert "-m gpu" in gpu and "--require-gpu" in gpu
    assert "--require-gpu" not in cpu
