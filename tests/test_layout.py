"""The package's layout, checked: one direction of imports, CuPy named only by the backend, plots that
leave matplotlib's global state alone, and files that refer to nothing outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gpubptt"


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip()


def test_analysing_a_model_imports_no_checkpoint_data_training_or_cli_code():
    loaded = _run(
        "import sys, numpy as np, gpubptt; from gpubptt import diagnostics as dg\n"
        "m = gpubptt.RNN(4, 5, 4, backend='numpy', dtype='float64', seed=0)\n"
        "dg.vanish_report(m, np.zeros((6, 2), dtype=np.int64), np.zeros((6, 2), dtype=np.int64))\n"
        "print(' '.join(sorted(k for k in sys.modules if k.startswith(('gpubptt', 'cupy', 'matplotlib')))))"
    ).split()
    for module in ("gpubptt.checkpoint", "gpubptt.data", "gpubptt.train", "gpubptt.run", "gpubptt.cli"):
        assert module not in loaded
    assert "gpubptt.diagnostics.problems" not in loaded and not [m for m in loaded if m.startswith("cupy")]
    # the builders are still one attribute away
    assert _run("from gpubptt import diagnostics as dg; print(dg.random_problem.__module__)") == (
        "gpubptt.diagnostics.problems"
    )


def test_only_the_backend_package_imports_or_branches_on_cupy():
    offenders = []
    # the communicators that move CuPy buffers (NCCL, MPI's staging) may import CuPy, but only inside a
    # function: importing them (and gpubptt.distributed) never imports CuPy
    lazy = {PACKAGE / "distributed" / "nccl.py", PACKAGE / "distributed" / "mpi.py"}
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "backend"):
            continue
        text = path.read_text(encoding="utf-8")
        if path in lazy:
            if re.search(r"^(import cupy|from cupy)", text, re.MULTILINE):  # at module level
                offenders.append(str(path.relative_to(ROOT)))
            continue
        if re.search(r"^\s*(import cupy|from cupy)|\.name\s*[!=]=\s*['\"]cupy['\"]", text, re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_plots_leave_the_users_matplotlib_backend_and_pyplot_alone(tmp_path):
    pytest.importorskip("matplotlib")
    out = _run(
        "import sys, matplotlib; matplotlib.use('svg')\n"
        "from gpubptt import plots; from gpubptt.train import History\n"
        "h = History(); h.step += [1, 2, 3]; h.loss += [3.0, 2.0, 1.5]; h.grad_norm += [1.0] * 3; h.lr += [0.1] * 3\n"
        f"plots.plot_history({str(tmp_path / 'h.png')!r}, h, chance=3.2, title='t')\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    assert out == "svg False"
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_project_files_refer_to_nothing_outside_the_repository():
    listed = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of the project's files")
    tracked = listed.stdout.split()
    outside = re.compile(r"ARCHITECTURE\.md|STYLE\.md|\.\./shared|DEVELOPERS\.md")
    hits = [f for f in tracked if f.endswith((".py", ".md", ".toml", ".cu")) and outside.search((ROOT / f).read_text())]
    assert hits == [], hits
