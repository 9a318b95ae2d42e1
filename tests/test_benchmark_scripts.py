"""The benchmark scripts' honesty rules: noisy rows flagged and kept out of summary ratios, results written
to a folder given on the command line (by default outside the repository), never over committed results."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    """A script of benchmarks/ as a module (they import their neighbours the way Python runs them)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_script_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


report = _load("_report")


def test_spread_above_ten_percent_is_noisy():
    assert report.NOISY_SPREAD == 0.1
    assert not report.is_noisy([1.0, 1.0, 1.02, 1.0])  # IQR 0.005 of a median 1.0
    assert report.is_noisy([0.5, 1.0, 1.0, 1.5])  # quartiles 0.875 and 1.125: IQR / median = 0.25
    assert report.is_noisy([0.0, 0.0, 0.0])  # a zero median cannot be judged


def test_summary_ratio_leaves_noisy_rows_out_and_counts_them():
    rows = [{"ratio": 1.0}, {"ratio": 3.0, "noisy": False}, {"ratio": 2.0}, {"ratio": 100.0, "noisy": True}]
    line, stats = report.summary_ratio(rows, "a ÷ b")
    assert stats == {"median": 2.0, "max": 3.0, "rows": 3, "noisy_rows_left_out": 1}
    assert line == "a ÷ b: median 2.00, max 3.00 over 3 rows; 1 noisy row (~) left out"


def test_summary_ratio_is_refused_when_every_row_is_noisy():
    line, stats = report.summary_ratio([{"ratio": 0.15, "noisy": True}, {"ratio": 0.2, "noisy": True}], "a ÷ b")
    assert stats is None
    assert line.startswith("a ÷ b: no summary") and "10%" in line
    assert "0.15" not in line and "0.2" not in line and "median 0" not in line


def test_table_summary_of_a_grid_leaves_noisy_rows_out(tmp_path):
    """benchmarks/table.py recomputes the grid's gpubptt ÷ torch from the clean rows only."""
    table = _load("table")
    steady, jumpy = [1.0, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.5]

    def row(ratio, torch_times):
        times = {"gpubptt": steady, "torch": torch_times}
        return {"T": 2, "B": 1, "D": 1, "H": 1, "K": 1, "tokens": False, "times_s": times, "gflops": 1.0,
                "median_s": {"gpubptt": 1.0, "torch": ratio}, "ratio_vs_torch": ratio, "efficiency": 0.5,
                "peak_bytes": 1, "T_B_K_bytes": 1}  # fmt: skip

    grid = {
        "schema": "gpubptt-perf-grid/1",
        "repeats": 4,
        "environment": {"backends": []},
        "median_ratio_vs_torch": 0.15,
    }
    grid["rows"] = [row(0.8, steady), row(1.2, steady), row(0.15, jumpy)]
    text = table.grid_summary("g.json", grid)
    assert "gpubptt ÷ torch: median 1.00, max 1.20 over 2 rows; 1 noisy row (~) left out" in text
    assert "| 0.15 ~ |" in text
    grid["rows"] = [row(0.15, jumpy)]
    text = table.grid_summary("g.json", grid)
    assert "gpubptt ÷ torch: no summary" in text and "median 0.15" not in text


def test_distributed_scaling_ratio_is_refused_from_a_noisy_row():
    distributed = _load("distributed")
    scaling = {
        "strong 1": {"ranks": 1, "tokens_per_s": 100.0, "noisy": False},
        "strong 2": {"ranks": 2, "tokens_per_s": 150.0, "noisy": False},
        "weak 1": {"ranks": 1, "tokens_per_s": 100.0, "noisy": True},
        "weak 2": {"ranks": 2, "tokens_per_s": 190.0, "noisy": False},
    }
    assert distributed.scaling_ratios(scaling) == {"strong": 1.5, "weak": None}


def test_default_output_folder_is_outside_the_repository(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert ROOT not in report.default_out_dir().resolve().parents
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = report.out_dir(None)
    assert folder == tmp_path / "gpubptt" / "benchmarks" and folder.is_dir()
    assert str(folder) in capsys.readouterr().err  # the default is printed, so the results can be found


@pytest.mark.parametrize(
    "script", sorted(p.name for p in BENCHMARKS.glob("*.py") if p.stem not in ("perf_grid", "perf_gated"))
)
def test_every_script_that_writes_results_takes_an_output_folder(script):
    """Each script either writes through ``--out DIR`` or writes nothing (table.py prints to stdout)."""
    text = (BENCHMARKS / script).read_text()
    writes = any(w in text for w in ("write_text(", "write_atomic(", 'open(args.out + ".json", "w")', "savefig("))
    if script in ("_report.py", "table.py"):
        assert not writes
    elif writes:
        assert "add_out_option(" in text and "out_dir(args.out)" in text


def test_delayed_recall_writes_to_the_default_folder_and_not_into_the_repository(tmp_path):
    committed = {p.name: p.stat().st_mtime_ns for p in BENCHMARKS.iterdir()}
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "MPLBACKEND": "Agg"}
    args = ["--delays", "2", "--seeds", "0", "--steps", "2", "--hidden", "4", "--batch", "2"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "delayed_recall.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "gpubptt" / "benchmarks"
    assert f"results go to {folder}" in result.stderr
    data = json.loads((folder / "delayed-recall.json").read_text())
    assert [r["delay"] for r in data["runs"]] == [2] and data["settings"]["steps"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in BENCHMARKS.iterdir()} == committed


def test_idle_ramp_times_each_pass_and_each_library_into_the_folder_given(tmp_path):
    committed = {p.name: p.stat().st_mtime_ns for p in BENCHMARKS.iterdir()}
    args = ["--out", str(tmp_path), "--pause", "0.01", "--mib", "1", "--passes", "3", "--rounds", "2",
            "--shape", "3,2,4,5,6"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "idle_ramp.py"), *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "idle-ramp.json").read_text())
    passes = data["memory_pass_s"]
    assert set(passes) == {"after_pause", "no_pause"} and all(len(v) == 3 and min(v) > 0 for v in passes.values())
    assert data["model"] == dict(cell="lstm", num_layers=1, T=3, B=2, D=4, H=5, K=6)
    libraries = {"gpubptt", "torch"} if importlib.util.find_spec("torch") else {"gpubptt"}
    assert set(data["calls_s"]) == libraries
    for calls in data["calls_s"].values():
        assert set(calls) == {"after_spin", "after_sleep", "next"} and min(calls.values()) > 0
    assert {p.name: p.stat().st_mtime_ns for p in BENCHMARKS.iterdir()} == committed


def test_idle_ramp_refuses_a_pause_of_zero_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "idle_ramp.py"), "--out", str(tmp_path), "--pause", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--pause must be positive" in result.stderr
    assert not (tmp_path / "idle-ramp.json").exists()
