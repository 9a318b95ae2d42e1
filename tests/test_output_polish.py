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
