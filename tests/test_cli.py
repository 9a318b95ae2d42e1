"""The command line, through Typer's CliRunner."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gpubptt.cli import app

runner = CliRunner()


def test_info_json_names_backend_and_versions():
    result = runner.invoke(app, ["info", "--backend", "numpy", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["backend"] == "numpy" and data["numpy"] and "numpy" in data["available_backends"]


def test_unknown_backend_option_is_a_usage_error():
    result = runner.invoke(app, ["info", "--backend", "tpu"])
    assert result.exit_code == 2
