"""What the command line prints around the work: --help at 80 columns, sizes echoed as written, a quiet install."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gpubptt.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_every_command_answers_dash_h_with_its_help(command):
    args = [command, "-h"] if command else ["-h"]
    result = runner.invoke(app, args, prog_name="gpubptt")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Usage: gpubptt {command}".rstrip()) and "-h, --help" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_fits_with_one_default_style_and_no_bool_metavar(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "<bool>" not in result.stdout  # a flag is a flag: no metavar
    assert "[default:" not in result.stdout  # one style, the one the help texts write: "(default: x)"
    options = result.stdout.split("\nOptions:\n", 1)[1]
    # help text starts by column 34 (a name longer than that gets its own line): at least 46 columns of prose
    starts = [len(m.group(1)) for m in re.finditer(r"^(  -.*?  +)\S", options, re.MULTILINE)]
    assert starts and max(starts) <= 34
    blocks = re.split(r"\n(?=  -)", options)  # one block per option: its name and its help lines
    assert all(block.count("(default:") <= 1 for block in blocks)


def test_train_help_shows_defaults_typer_knew_in_the_same_style_as_the_written_ones():
    result = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    text = " ".join(result.stdout.split())
    assert "Backend to train on. (default: auto)" in text  # a default Typer would have shown as [default: auto]
    assert "Hidden size H. (default: 256)" in text  # a default the help text writes itself
    assert "--force / --no-force Overwrite an existing checkpoint with a new run. --" in text  # off: nothing added


def test_max_memory_is_echoed_as_written_beside_its_size(tmp_path):
    """512M is 512·2^20 bytes = 536.9 MB: the log says both, never only a number the user did not write."""
    args = ["train", "--task", "recall", "--delay", "20", "--chunk", "0", "--hidden", "8", "--batch", "2"]
    args += ["--steps", "1", "--eval-every", "1", "--backend", "numpy", "--checkpoint", str(tmp_path / "ck.npz")]
    result = runner.invoke(app, [*args, "--max-memory", "512M"])
    assert result.exit_code == 0, result.output
    assert "--max-memory 512M = 536.9 MB" in result.output
    result = runner.invoke(app, [*args, "--force", "--max-memory", "600000000"])
    assert "--max-memory 600.0 MB" in result.output  # plain bytes: the size alone


def test_editable_install_takes_setuptools_plain_path_strategy():
    """With package-dir {"": "."} and the package at the top of the tree, setuptools' editable install is
    one .pth line; without it, setuptools picked its meta-path-finder strategy, whose boxed
    'Editable installation' warning pip printed on every make target's install."""
    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"": "."}
    include = setuptools["packages"]["find"]["include"]
    assert include == ["gpubptt*"] and (ROOT / "gpubptt" / "__init__.py").is_file()


# -- the vanish figures ----------------------------------------------------------------------------
@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions draw (laid out, as they are saved), in place of writing PNGs."""
    pytest.importorskip("matplotlib")
    from gpubptt import plots

    figures = []

    def keep(fig, path, **_):
        fig.canvas.draw()
        figures.append(fig)

    monkeypatch.setattr(plots, "save_png", keep)
    from gpubptt.diagnostics import gated

    monkeypatch.setattr(gated, "save_png", keep)  # imported by name there
    return figures


def _tiny(layers: int = 1):
    import numpy as np

    import gpubptt

    model = gpubptt.RNN(6, 8, 6, backend="numpy", dtype="float64", seed=0, num_layers=layers)
    rng = np.random.default_rng(0)
    return model, rng.integers(0, 6, size=(10, 2)), rng.integers(0, 6, size=(10, 2))


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _titles_clear_of_the_figure_title(fig):
    renderer = fig.canvas.get_renderer()
    top = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        if ax.get_title():
            assert not _overlap(top, ax.title.get_window_extent(renderer)), ax.get_title()
            assert ax.title.get_window_extent(renderer).y1 < top.y0  # below it, not beside it


def test_vanish_figure_title_clears_the_panel_titles(drawn):
    from gpubptt import diagnostics, plots

    model, x, y = _tiny()
    plots.plot_vanish(diagnostics.vanish_sweep(model, x, y, [0.5, 1.5], iters=10), "v.png", title="a title")
    _titles_clear_of_the_figure_title(drawn[0])


def test_one_radius_puts_its_heatmap_beside_the_truncation_panel(drawn):
    """A row of its own for a single square heatmap left most of that row blank: 2 × 2 panels instead."""
    from gpubptt import diagnostics, plots

    model, x, y = _tiny()
    plots.plot_vanish(diagnostics.vanish_sweep(model, x, y, [0.9], iters=10), "v.png", title="a title")
    fig = drawn[0]
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 and len(panels[3].images) == 1
    truncation, heat = panels[2].get_position(), panels[3].get_position()
    assert heat.x0 > truncation.x1 and heat.y0 < truncation.y1 and truncation.y0 < heat.y1  # the same row
    _titles_clear_of_the_figure_title(fig)


def test_stack_figure_legends_are_short_and_the_title_clears_the_panels(drawn):
    """Colours (radius) in one legend, line styles (layer) in another: not one entry per (radius, layer)."""
    from gpubptt import diagnostics, plots

    model, x, y = _tiny(layers=3)
    radii = [0.5, 0.9, 1.0, 1.5, 2.0]
    plots.plot_stack(diagnostics.stack_sweep(model, x, y, radii, iters=10), "s.png", title="a title")
    fig = drawn[0]
    entries = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()]
    assert sorted(entries) == [["layer 0", "layer 1", "layer 2"], [f"ρ={r:g}" for r in radii]]
    _titles_clear_of_the_figure_title(fig)


def test_cells_truncation_panel_draws_k_0_at_0_and_leaves_rounding_out(drawn):
    """k = 0 sits at 0 (a log axis had moved it to 0.5) and the exact window's ~1e-16 is not drawn (it
    squashed the other points into the top of the panel)."""
    import numpy as np

    from gpubptt.diagnostics import gated

    flows = gated.compare_cells(["rnn", "lstm"], 6, 8, 2, 5, seed=0)
    gated.plot_cells(flows, "c.png", title="a title")
    fig = drawn[0]
    panel = fig.axes[2]
    assert panel.get_xscale() == "symlog"
    for line in panel.lines:
        k, err = line.get_data()
        assert k[0] == 0
        drawn_err = np.asarray(err, dtype=float)[np.isfinite(np.asarray(err, dtype=float))]
        assert drawn_err.min() > 1e-12
    assert panel.get_ylim()[0] > 1e-13
    _titles_clear_of_the_figure_title(fig)


# -- gpubptt bench's table -------------------------------------------------------------------------
def _times(spread_out: bool):
    """A stand-in for bench's time_interleaved: every run 10 ms, or (spread_out) runs from 5 to 15 ms."""
    import numpy as np

    def fake(fns, *, warmup, repeats):
        return {name: list(np.linspace(0.005, 0.015, repeats) if spread_out else [0.01] * repeats) for name in fns}

    return fake


BENCH = ["bench", "--backend", "numpy", "--seq-lens", "2,4", "--hidden-sizes", "3,5", "--batch", "2", "--vocab", "5"]
BENCH += ["--warmup", "0", "--repeats", "4"]


def test_bench_table_fits_100_columns_and_prints_no_legend_for_what_it_does_not_show(monkeypatch):
    import gpubptt.bench as bench_lib

    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _times(spread_out=False))
    result = runner.invoke(app, BENCH)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "eff = GFLOP/s" in result.stdout  # the eff column is shown: its legend is
    assert "×torch" not in result.stdout and "×naive" not in result.stdout  # no comparison, no legend for one
    assert "noisy" not in result.stdout and "~" not in result.stdout  # no noisy row, no legend for noise


def test_bench_table_with_a_reference_and_noisy_rows_explains_both_within_100_columns(monkeypatch):
    import json

    import gpubptt.bench as bench_lib

    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _times(spread_out=True))
    result = runner.invoke(app, [*BENCH, "--compare", "naive"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert "×naive = reference time ÷ gpubptt time" in result.stdout and "×torch" not in result.stdout
    assert "~ noisy: IQR/median above 10%" in result.stdout
    monkeypatch.setattr(bench_lib.runner, "time_interleaved", _times(spread_out=True))
    data = json.loads(runner.invoke(app, [*BENCH, "--compare", "naive", "--format", "json"]).stdout)
    row = data["rows"][0]  # the JSON keeps what the table leaves out
    assert {"min_s", "iqr_s", "times_s"} <= set(row["bptt"]) and "gflops" in row["gemm"]
