"""`bench` and `sample` keep what they measured and say what did not fit: each test failed before its fix.

A size the model check refuses (InsufficientMemoryError) or an array NumPy cannot make was a traceback that lost
the rows measured before it; `bench --recompute` lost every row when a later T's inputs did not fit, printed no
table beside a JSON `--output` and lost the JSON when the file could not be written; `sample --which best` with a
name the file system refuses was a raw OSError.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from gpubptt import bench as bench_lib
from gpubptt.cli import app
from gpubptt.engine.memory import is_out_of_memory

runner = CliRunner()
SMALL = ["--backend", "numpy", "--batch", "2", "--vocab", "5", "--repeats", "1", "--warmup", "0"]


def test_a_size_that_cannot_fit_is_an_out_of_memory_row_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "rows.json"
    args = ["bench", *SMALL, "--seq-lens", "2,3", "--hidden-sizes", "4,100000", "--output", str(out), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    status = {(r["sweep"], r["T"], r["H"]): r["status"] for r in rows}
    assert status[("H", rows[-1]["T"], 100000)] == "out of memory" and status[("H", rows[-1]["T"], 4)] == "ok"
    assert [s for (sweep, _, _), s in status.items() if sweep == "T"] == ["ok", "ok"]
    too_big = ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size")
    assert is_out_of_memory(too_big) and not is_out_of_memory(ValueError("x"))


def test_recompute_keeps_the_rows_measured_before_a_t_that_does_not_fit(tmp_path, monkeypatch):
    from gpubptt.backend.numpy_backend import NumpyBackend

    real = NumpyBackend.asarray

    def asarray(self, a, *args, **kw):
        if np.shape(a)[:1] == (4096,):  # this T's inputs cannot be made
            raise MemoryError("Unable to allocate 1 TiB")
        return real(self, a, *args, **kw)

    monkeypatch.setattr(NumpyBackend, "asarray", asarray)
    out = tmp_path / "long.json"
    out.write_text("OLD")
    args = ["bench", *SMALL[:6], "--recompute", "sqrt,none", "--seq-lens", "8,4096,16", "--fixed-hidden", "4"]
    result = runner.invoke(app, [*args, "--output", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [(r["T"], "skipped" in r) for r in rows] == [(8, False)] * 2 + [(4096, True)] * 2 + [(16, False)] * 2
    assert "out of memory for the (T, B) inputs" in rows[2]["skipped"]
    assert "T=8" in result.stdout and "T=16" in result.stdout  # the table beside the JSON file, as --help says


def test_recompute_prints_the_json_when_its_file_cannot_be_written(tmp_path, monkeypatch):
    def fail(path, text, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gpubptt.cli.bench.write_atomic", fail)
    args = ["bench", *SMALL[:6], "--recompute", "sqrt", "--seq-lens", "4,8", "--fixed-hidden", "4"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "r.json")])
    assert result.exit_code == 1 and "could not write" in result.stderr
    assert json.loads(result.stdout)["budget_bytes"] > 0  # the file's content, not the table


def test_recompute_refuses_a_model_that_cannot_fit_in_one_line():
    args = ["bench", *SMALL[:6], "--recompute", "sqrt", "--seq-lens", "4", "--fixed-hidden", "100000"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.output
    assert "needs about" in result.stderr


@pytest.mark.parametrize("command", ["sample", "vanish"])
def test_which_best_with_a_name_the_file_system_refuses_is_a_usage_error(tmp_path, command):
    name = tmp_path / ("a" * 250 + ".npz")
    result = runner.invoke(app, [command, "--checkpoint", str(name), "--which", "best"])
    assert result.exit_code == 2 and "--which best" in result.stderr and "File name too long" in result.stderr


def test_recompute_prints_the_table_when_its_file_cannot_be_written_even_when_quiet(tmp_path, monkeypatch):
    def fail(path, text, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gpubptt.cli.bench.write_atomic", fail)
    args = ["bench", *SMALL[:6], "--recompute", "sqrt", "--seq-lens", "4", "--fixed-hidden", "4", "--format", "table"]
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "r.txt"), "-q"])
    assert result.exit_code == 1 and "could not write" in result.stderr
    assert "T=4" in result.stdout  # the rows, which would be lost otherwise


def test_compare_naive_refuses_relu_it_would_time_a_tanh_rnn_against():
    """The textbook code is tanh: a relu model was timed and reported against it (its gradients 0.98 apart)."""
    with pytest.raises(ValueError, match="compares nonlinearity 'tanh' only, got 'relu'"):
        bench_lib.BenchConfig(["numpy"], [6], [8], batch=3, D=5, K=5, compare="naive", nonlinearity="relu")
    result = runner.invoke(app, ["bench", *SMALL, "--seq-lens", "6", "--hidden-sizes", "8", "--compare", "naive",
                                 "--nonlinearity", "relu", "-q"])  # fmt: skip
    assert result.exit_code == 2 and "--nonlinearity tanh only" in result.output
    data = bench_lib.run_bench(bench_lib.BenchConfig(["numpy"], [2], [3], batch=2, D=4, K=4, warmup=0, repeats=1))
    assert "one layer" in data["flop_model"]["applies_to"]
