"""`gpubptt bench` / `gpubptt info` and the bench library, on tiny sizes (no test asserts a speed)."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from gpubptt import _io, cli, plots
from gpubptt import backend as backend_mod
from gpubptt import bench as bench_lib
from gpubptt._io import write_atomic
from gpubptt._paths import check_writable
from gpubptt.cli import app
from gpubptt.errors import InputError

from .images import assert_png_drawn
from .reference import numeric_grad, ref_loss

runner = CliRunner()
TINY = ["--seq-lens", "2,4", "--hidden-sizes", "3,5", "--batch", "2", "--vocab", "5", "--warmup", "0", "--repeats", "2"]


def bench(*args: str):
    return runner.invoke(app, ["bench", "--backend", "numpy", *TINY, *args])


def _positive(summary: dict) -> bool:
    return summary["median_s"] > 0 and summary["min_s"] > 0 and summary["iqr_s"] >= 0 and min(summary["times_s"]) > 0


# -- JSON -------------------------------------------------------------------------------------------
def test_json_schema_holds_environment_rows_and_fits():
    result = bench("--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == "gpubptt.bench/1"
    env = data["environment"]
    assert env["machine"]["cpu_count"] >= 1 and env["versions"]["numpy"] == np.__version__
    device = backend_mod.get_backend("numpy").device  # e.g. "CPU (x86_64, 2 logical cores)"
    assert device.startswith("CPU (")
    gemm = backend_mod.get_backend("numpy").blas_library  # the library behind matmul: MKL or NumPy's BLAS
    assert env["backends"] == [
        {"name": "numpy", "device": device, "library": "numpy", "version": np.__version__, "gemm": gemm}
    ]
    assert data["config"]["dtype"] == "float32" and data["config"]["input"] == "tokens"
    # T sweep at the middle H (3), H sweep at the middle T (2): 2 + 2 rows
    assert [(r["sweep"], r["T"], r["H"]) for r in data["rows"]] == [("T", 2, 3), ("T", 4, 3), ("H", 2, 3), ("H", 2, 5)]
    for r in data["rows"]:
        assert r["status"] == "ok" and r["backend"] == "numpy"
        assert _positive(r["bptt"]) and _positive(r["forward"]) and len(r["bptt"]["times_s"]) == 2
        assert r["tokens_per_s"] > 0 and r["us_per_step"] > 0 and r["gflops"] > 0 and r["efficiency"] > 0
        assert r["gemm"]["step_gflops"] > 0 and r["gemm"]["batched_gflops"] > 0
    assert {(f["impl"], f["sweep"]) for f in data["fits"]} == {("gpubptt", "T"), ("gpubptt", "H")}
    assert all(isinstance(f["exponent"], float) and f["points"] == 2 for f in data["fits"])


def test_flop_counts_match_the_formula_counted_by_hand():
    result = bench("--format", "json", "--batch", "3", "--vocab", "7", "--output-size", "6")
    rows = json.loads(result.stdout)["rows"]
    for r in rows:
        T, B, H, K = r["T"], 3, r["H"], 6
        # tokens: U x is a gather; per step 3 (B,H)x(H,H)-sized products and 3 (B,H)x(H,K)-sized ones
        assert r["flops"] == 2 * T * (3 * B * H * H + 3 * B * H * K)
        assert r["flops_forward"] == 2 * T * (B * H * H + B * H * K)
        assert r["gflops"] == pytest.approx(r["flops"] / r["bptt"]["median_s"] / 1e9)
        assert r["tokens_per_s"] == pytest.approx(T * B / r["bptt"]["median_s"])
        assert r["us_per_step"] == pytest.approx(r["bptt"]["median_s"] / T * 1e6)


def test_dense_flop_counts_include_the_input_products():
    result = bench("--format", "json", "--input", "dense", "--input-size", "4", "--output-size", "6")
    assert result.exit_code == 0, result.output
    for r in json.loads(result.stdout)["rows"]:
        T, B, D, H, K = r["T"], 2, 4, r["H"], 6
        fwd = 2 * T * B * (D * H + H * H + H * K)  # U x, W s, V s
        bwd = 2 * T * B * (H * K + H * K + H * H + H * H + H * D)  # do V, dV, δ W, dW, dU
        assert r["flops_forward"] == fwd and r["flops"] == fwd + bwd


def test_float64_and_all_backends_run():
    result = bench("--format", "json", "--dtype", "float64", "--backend", "all")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"]["dtype"] == "float64" and {r["backend"] for r in data["rows"]} >= {"numpy"}


def test_fit_exponent_recovers_a_power_law():
    sizes = [2, 4, 8, 16]
    assert bench_lib.fit_exponent(sizes, [3 * s**1.5 for s in sizes]) == pytest.approx(1.5)
    assert bench_lib.fit_exponent([8], [1.0]) is None


def test_summary_statistics_of_known_times():
    s = bench_lib.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s == {"median_s": 3.0, "min_s": 1.0, "iqr_s": 2.0, "spread": 2 / 3, "times_s": [4.0, 1.0, 3.0, 2.0, 5.0]}


def test_noisy_means_iqr_over_median_above_the_threshold():
    assert bench_lib.NOISY_SPREAD == 0.1
    assert not bench_lib.is_noisy(bench_lib.summarize([1.0, 1.0, 1.0, 1.0]))
    assert not bench_lib.is_noisy(bench_lib.summarize([0.95, 1.0, 1.0, 1.05]))  # IQR/median 0.05
    assert bench_lib.is_noisy(bench_lib.summarize([0.8, 1.0, 1.0, 1.2]))  # IQR/median 0.2
    assert not bench_lib.is_noisy({"median_s": 1.0, "iqr_s": 0.05})  # an older result, without "spread"


def _synthetic_times(noisy_call: int):
    """A stand-in for time_interleaved: fixed times, with the bptt runs of call ``noisy_call`` spread 1 to 2 s."""
    calls = iter(range(100))

    def fake(fns, *, warmup, repeats):
        n = next(calls)
        times = {name: [0.01] * repeats for name in fns}
        if n == noisy_call:
            times["bptt"] = list(np.linspace(1.0, 2.0, repeats))
        return times

    return fake


def test_noisy_rows_are_flagged_in_json_csv_and_table_and_so_are_fits_through_them(monkeypatch):
    # runs in order (T=2, H=3), (T=4, H=3), (T=2, H=5): the (T=2, H=3) point sits in both sweeps, measured once
    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _synthetic_times(noisy_call=1))
    data = json.loads(bench("--format", "json", "--repeats", "4").stdout)
    assert data["schema"] == "gpubptt.bench/1" and data["noisy_spread"] == 0.1
    flags = {(r["sweep"], r["T"], r["H"]): r["noisy"] for r in data["rows"]}
    assert flags == {("T", 2, 3): False, ("T", 4, 3): True, ("H", 2, 3): False, ("H", 2, 5): False}
    noisy_row = next(r for r in data["rows"] if r["noisy"])
    assert noisy_row["bptt"]["spread"] == pytest.approx(0.5 / 1.5)
    assert {f["sweep"]: (f["noisy_points"], f["points"]) for f in data["fits"]} == {"T": (1, 2), "H": (0, 2)}

    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _synthetic_times(noisy_call=1))
    rows = list(csv.DictReader(io.StringIO(bench("--format", "csv", "--repeats", "4").stdout)))
    assert [r["noisy"] for r in rows] == ["False", "True", "False", "False"]

    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _synthetic_times(noisy_call=1))
    table = bench("--repeats", "4").stdout
    (noisy_line,) = [line for line in table.splitlines() if " 33% ~" in line]
    assert noisy_line.split()[:2] == ["4", "3"]  # the T=4, H=3 row, and no other
    (fit_t,) = [line for line in table.splitlines() if "time ∝ T^" in line]
    (fit_h,) = [line for line in table.splitlines() if "time ∝ H^" in line]
    assert "rests on 1 noisy of 2 points" in fit_t and "noisy" not in fit_h
    assert "IQR/median above 10%" in table  # the legend gives the threshold


# -- CSV and table --------------------------------------------------------------------------------
def test_csv_has_a_header_and_one_line_per_row():
    result = bench("--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 4 and list(rows[0]) == bench_lib.CSV_COLUMNS
    for r in rows:
        assert float(r["bptt_median_s"]) > 0 and float(r["efficiency"]) > 0 and r["status"] == "ok"
        assert len(r["bptt_times_s"].split(";")) == 2


def test_table_shows_times_efficiency_and_fitted_exponents():
    result = bench()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "fwd+BPTT ms" in out and "eff" in out and "GEMM GFLOP/s" in out
    assert "time ∝ T^" in out and "time ∝ H^" in out
    assert "gpubptt bench" in result.stderr  # messages on stderr, results on stdout


def test_quiet_prints_nothing_on_stderr():
    result = bench("--quiet")
    assert result.exit_code == 0 and result.stderr == "" and "fwd+BPTT ms" in result.stdout


# -- errors ---------------------------------------------------------------------------------------
def test_cupy_backend_without_gpu_exits_nonzero_with_a_readable_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(backend_mod, "_CACHE", {})
    result = runner.invoke(app, ["bench", "--backend", "cupy", *TINY])
    assert result.exit_code != 0
    assert "CuPy" in result.stderr and "pip install" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--seq-lens", "a,b"],
        ["--seq-lens", "0,4"],
        ["--hidden-sizes", ""],
        ["--batch", "0"],
        ["--repeats", "0"],
        ["--warmup", "-1"],
        ["--dtype", "float16"],
        ["--input", "images"],
        ["--compare", "tensorflow"],
        ["--format", "xml"],
        ["--backend", "tpu"],
        ["--input-size", "4"],  # only for --input dense
        ["--output", "/nonexistent-folder/out.json"],
    ],
)
def test_bad_option_values_are_usage_errors(args):
    result = bench(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_compare_torch_without_torch_says_how_to_install_and_continues(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    result = bench("--compare", "torch", "--format", "json")
    assert result.exit_code == 0, result.output
    assert "pip install torch" in result.stderr
    data = json.loads(result.stdout)
    assert data["config"]["compare"] == "none" and all("torch" not in r for r in data["rows"])


def test_library_records_a_skipped_torch_comparison(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    cfg = bench_lib.BenchConfig(["numpy"], [2], [3], batch=2, D=4, K=4, warmup=0, repeats=1, compare="torch")
    data = bench_lib.run_bench(cfg)
    assert "pip install torch" in data["notes"][0] and "torch" not in data["rows"][0]


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch):
    class OutOfMemoryError(Exception):  # named like CuPy's and torch.cuda's
        pass

    real = bench_lib.runner.RNN

    def rnn(D, H, K, **kw):
        if H == 5:
            raise OutOfMemoryError("out of memory allocating 1 TB")
        if H == 7:
            raise MemoryError
        return real(D, H, K, **kw)

    monkeypatch.setattr(bench_lib.runner, "RNN", rnn)
    result = bench("--format", "json", "--hidden-sizes", "3,5,7")
    assert result.exit_code == 0, result.output
    status = {r["H"]: r["status"] for r in json.loads(result.stdout)["rows"] if r["sweep"] == "H"}
    assert status == {3: "ok", 5: "out of memory", 7: "out of memory"}
    assert "out of memory" in bench("--hidden-sizes", "3,5").stdout


# -- files ----------------------------------------------------------------------------------------
@pytest.fixture
def no_run(monkeypatch):
    """Makes any measurement fail the test: a check that must come before the work ran too late."""

    def measured(*args, **kwargs):
        raise AssertionError("bench measured before refusing a bad destination")

    monkeypatch.setattr(bench_lib.runner, "_measure", measured)


def _oserror(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def test_bench_help_and_behaviour_agree_on_where_the_table_goes(tmp_path: Path):
    params = {p.name: p for p in typer.main.get_command(app).commands["bench"].params}
    assert "instead of stdout" not in params["output"].help
    assert "table still prints on stdout unless --quiet" in params["output"].help
    assert "with --output, no table on stdout" in params["quiet"].help
    assert "fwd+BPTT ms" in bench("--output", str(tmp_path / "r.json")).stdout
    assert bench("--output", str(tmp_path / "r.json"), "--quiet").stdout == ""


@pytest.mark.parametrize("option", ["--output", "--plot"])
@pytest.mark.parametrize("where", ["a folder", "under a regular file"])
def test_destination_that_is_no_file_path_is_refused_before_any_work(tmp_path: Path, no_run, option, where):
    (tmp_path / "file").write_text("keep")
    target = tmp_path / "r.png" if where == "a folder" else tmp_path / "file" / "r.png"
    target.mkdir() if where == "a folder" else None
    result = bench(option, str(target))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {option} {str(target)!r}") and "expected" in result.stderr
    assert (tmp_path / "file").read_text() == "keep" and result.stdout == ""


def test_read_only_folder_is_refused_before_any_work(tmp_path: Path, monkeypatch, no_run):
    # a read-only mount, as root sees one: creating a file there fails whatever os.access says
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    result = bench("--output", str(tmp_path / "r.json"))
    assert result.exit_code == 2, result.output
    assert f"error: --output {str(tmp_path / 'r.json')!r}" in result.stderr
    assert os.strerror(errno.EROFS) in result.stderr and str(tmp_path) in result.stderr


def test_full_disk_is_refused_before_any_work(tmp_path: Path, monkeypatch, no_run):
    out = tmp_path / "r.json"
    out.write_text("old results")
    monkeypatch.setattr(os, "fsync", _oserror(errno.ENOSPC))  # the disk takes no more data
    result = bench("--output", str(out))
    assert result.exit_code == 2, result.output
    assert "error: --output" in result.stderr and os.strerror(errno.ENOSPC) in result.stderr
    assert out.read_text() == "old results" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_probe_leaves_the_folder_and_an_existing_file_as_they_were(tmp_path: Path):
    out = tmp_path / "r.json"
    check_writable(out, "--output")
    assert list(tmp_path.iterdir()) == []
    out.write_text("old")
    check_writable(out, "--output")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(InputError, match=r"--output .*does not exist; expected a file in an existing folder"):
        check_writable(tmp_path / "missing" / "r.json", "--output")


@pytest.mark.parametrize(("suffix", "quiet"), [("json", False), ("txt", True)], ids=["json", "table-quiet"])
def test_failed_final_write_prints_the_results_keeps_the_old_file_and_fails(tmp_path: Path, monkeypatch, suffix, quiet):
    out = tmp_path / f"r.{suffix}"
    out.write_text("old results")
    monkeypatch.setattr(cli.bench, "write_atomic", _oserror(errno.ENOSPC))  # the disk fills up during the run
    result = bench("--output", str(out), *(["--quiet"] if quiet else []))
    assert result.exit_code == 1, result.output
    assert f"error: --output: could not write {str(out)!r}" in result.stderr
    assert os.strerror(errno.ENOSPC) in result.stderr and "Traceback" not in result.output
    if suffix == "json":
        assert json.loads(result.stdout)["schema"] == "gpubptt.bench/1"  # the whole result, on stdout
    else:
        assert "fwd+BPTT ms" in result.stdout and "time ∝ T^" in result.stdout
    assert out.read_text() == "old results"


def test_failed_plot_write_still_shows_the_table_and_fails(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(plots, "plot_unavailable_reason", lambda: None)
    monkeypatch.setattr(plots, "plot_bench", _oserror(errno.ENOSPC))
    png = tmp_path / "r.png"
    result = bench("--plot", str(png))
    assert result.exit_code == 1, result.output
    assert (
        f"error: --plot: could not write {str(png)!r}" in result.stderr and os.strerror(errno.ENOSPC) in result.stderr
    )
    assert "fwd+BPTT ms" in result.stdout and not png.exists()


def test_output_and_plot_naming_one_file_is_refused(tmp_path: Path, monkeypatch, no_run):
    monkeypatch.setattr(plots, "plot_unavailable_reason", lambda: None)
    png = tmp_path / "r.png"
    result = bench("--output", str(png), "--plot", str(tmp_path / "." / "r.png"))
    assert result.exit_code == 2, result.output
    assert "error: --output and --plot name the same file" in result.stderr


def test_output_file_is_written_in_the_format_of_its_suffix(tmp_path: Path):
    out = tmp_path / "r.json"
    result = bench("--output", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["schema"] == "gpubptt.bench/1"
    assert "fwd+BPTT ms" in result.stdout  # the table still goes to stdout
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    csv_out = tmp_path / "r.csv"
    assert bench("--output", str(csv_out), "--quiet").stdout == ""
    assert csv_out.read_text().startswith("backend,sweep,T,H")


def test_failed_run_leaves_the_existing_output_file_untouched(tmp_path: Path, monkeypatch):
    out = tmp_path / "r.json"
    out.write_text("old results")

    def broken(*args, **kwargs):
        raise RuntimeError("the run broke")

    monkeypatch.setattr(bench_lib.runner, "_measure", broken)
    result = bench("--output", str(out))
    assert result.exit_code != 0
    assert out.read_text() == "old results" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_atomic_keeps_the_old_file_when_the_replace_fails(tmp_path: Path, monkeypatch):
    out = tmp_path / "r.csv"
    out.write_text("old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(out, "new")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_plot_writes_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    result = bench("--plot", str(png), "--compare", "naive")
    assert result.exit_code == 0, result.output
    assert_png_drawn(png, 1210, 495)  # figsize (11, 4.5) at 110 dpi


def test_plot_without_matplotlib_fails_before_running(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = bench("--plot", str(tmp_path / "r.png"))
    assert result.exit_code != 0 and "pip install matplotlib" in result.stderr
    assert "fwd+BPTT" not in result.stdout


# -- references -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [True, False], ids=["tokens", "dense"])
def test_naive_reference_matches_finite_differences(tokens):
    rng = np.random.default_rng(1)
    T, B, D, H, K = 4, 2, 3, 5, 4
    params = {"U": rng.normal(size=(H, D)), "W": rng.normal(size=(H, H)) * 0.5, "V": rng.normal(size=(K, H))}
    x = rng.integers(0, D, size=(T, B)) if tokens else rng.normal(size=(T, B, D))
    y = rng.integers(0, K, size=(T, B))
    loss, grads = bench_lib.naive_loss_and_grads(params["U"], params["W"], params["V"], x, y, tokens=tokens)
    assert loss == pytest.approx(ref_loss(params, x, y), rel=1e-12)
    for k in ("U", "W", "V"):
        num = numeric_grad(lambda: ref_loss(params, x, y), params[k])
        np.testing.assert_allclose(grads[k], num, rtol=1e-6, atol=1e-8)


def test_compare_naive_reports_gradient_agreement_and_ratio():
    result = bench("--compare", "naive", "--format", "json", "--batch", "6", "--dtype", "float64")
    assert result.exit_code == 0, result.output
    for r in json.loads(result.stdout)["rows"]:
        n = r["naive"]
        assert n["grads_match"] and max(n["grad_rel_err"].values()) < 1e-9
        assert n["measured_examples"] == 4 and n["scale"] == 1.5 and n["ratio"] > 0 and _positive(n["bptt"])


def test_compare_torch_reports_gradient_agreement_and_ratio():
    pytest.importorskip("torch")
    for extra in ([], ["--input", "dense", "--input-size", "4"]):
        result = bench("--compare", "torch", "--format", "json", "--dtype", "float64", *extra)
        assert result.exit_code == 0, result.output
        for r in json.loads(result.stdout)["rows"]:
            t = r["torch"]
            assert t["grads_match"] and max(t["grad_rel_err"].values()) < 1e-9
            assert t["ratio"] > 0 and _positive(t["bptt"]) and _positive(t["forward"])


# -- info -----------------------------------------------------------------------------------------
def test_info_reports_blas_threads_and_versions():
    result = runner.invoke(app, ["info", "--backend", "numpy", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "numpy" and data["versions"]["numpy"] == np.__version__
    assert data["threads"]["cpu_count"] >= 1 and isinstance(data["blas"], dict)
    text = runner.invoke(app, ["info", "--backend", "numpy"])
    assert text.exit_code == 0 and "threads.cpu_count" in text.stdout and "versions.numpy" in text.stdout


def test_time_interleaved_runs_warmups_then_rounds_of_each_function():
    calls: list[str] = []
    clock = iter(range(1, 100))

    def timer(fn):
        fn()
        return float(next(clock))

    fns = {"a": (lambda: calls.append("a"), timer), "b": (lambda: calls.append("b"), timer)}
    times = bench_lib.time_interleaved(fns, warmup=1, repeats=2)
    assert calls == ["a", "b"] * 3
    assert times == {"a": [3.0, 5.0], "b": [4.0, 6.0]}  # the warm-up runs (1, 2) are not reported


def test_write_atomic_gives_new_files_the_usual_mode_and_keeps_an_existing_mode(tmp_path: Path):
    umask = os.umask(0o022)
    try:
        new = tmp_path / "new.json"
        write_atomic(new, "{}")
        assert new.stat().st_mode & 0o777 == 0o644 and new.read_text() == "{}"
        old = tmp_path / "old.json"
        old.write_text("x")
        old.chmod(0o600)
        write_atomic(old, b"y")
        assert old.stat().st_mode & 0o777 == 0o600 and old.read_bytes() == b"y"
    finally:
        os.umask(umask)


# -- GPU (skips with the reason where CuPy cannot run) ----------------------------------------------
def test_bench_runs_on_cupy_with_synchronised_positive_times(cupy_be):
    result = runner.invoke(app, ["bench", "--backend", "cupy", *TINY, "--format", "json", "--compare", "naive"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["environment"]["backends"][0]["name"] == "cupy"
    for r in data["rows"]:
        assert r["status"] == "ok" and _positive(r["bptt"]) and _positive(r["forward"]) and r["naive"]["grads_match"]


def test_compare_torch_on_cupy_runs_torch_on_the_same_gpu(cupy_be):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    result = runner.invoke(app, ["bench", "--backend", "cupy", *TINY, "--format", "json", "--compare", "torch"])
    assert result.exit_code == 0, result.output
    for r in json.loads(result.stdout)["rows"]:
        assert r["torch"]["device"].startswith("cuda") and r["torch"]["grads_match"] and r["torch"]["ratio"] > 0


def test_gemm_rate_charges_each_cells_own_sequential_products():
    from gpubptt.cells import make_cell

    T, B, H, K = 10, 4, 8, 6
    times = {"gemm_step": [2.0], "gemm_batched": [1.0]}  # seconds: rates follow from the references' FLOPs
    batched = 2 * T * B * H * K / 1.0 / 1e9
    for name, G in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        cell = make_cell(name)
        rates, rate = bench_lib.gemm_rate(times, T, B, H, K, 1e6, recurrences=2, cell=cell)
        step = 2 * B * H * G * H * T / 2.0 / 1e9  # T (B, H)×(H, G·H) products in 2 s
        assert rates["step_gflops"] == pytest.approx(step) and rates["batched_gflops"] == pytest.approx(batched)
        rec = 2 * 4 * B * G * H * H * T  # forward W s and backward δ W of both recurrences
        assert rate == pytest.approx(1e6 / 1e9 / (rec / 1e9 / step + (1e6 - rec) / 1e9 / batched))
    _, rate = bench_lib.gemm_rate(times, T, B, H, K, 1e6, cell=make_cell("indrnn"))
    assert rate == pytest.approx(batched)  # an elementwise recurrence: no product waits on the step before


def test_bench_config_takes_the_cells_own_nonlinearity():
    assert bench_lib.BenchConfig(backends=[], cell="indrnn").nonlinearity == "relu"  # as RNN(cell="indrnn")
    assert bench_lib.BenchConfig(backends=[], cell="indrnn", nonlinearity="tanh").nonlinearity == "tanh"
    assert bench_lib.BenchConfig(backends=[]).nonlinearity == "tanh"
    with pytest.raises(ValueError, match="applies to the cells that take one"):
        bench_lib.BenchConfig(backends=[], cell="gru", nonlinearity="relu")


def test_the_table_and_csv_say_which_cell_and_precision_and_keep_the_backend_tag(tmp_path: Path):
    result = bench("--cell", "lstm", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    table = bench_lib.render(data, "table")
    assert "lstm, B=" in table and "[numpy]" in table  # the fit lines name their backend (was: a rich tag, eaten)
    data["notes"] = ["a note with [bold]brackets[/bold] and [numpy]"]
    assert "a note with [bold]brackets[/bold] and [numpy]" in bench_lib.render(data, "table")
    rows = list(csv.DictReader(io.StringIO(bench_lib.render(data, "csv"))))
    assert {(r["cell"], r["precision"]) for r in rows} == {("lstm", "fp32")}
