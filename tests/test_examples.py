"""The examples in examples/ and the docs pages on heads and on PyTorch run, at reduced sizes, in a
temporary folder; each example's result is checked against what its task allows (above chance, below
a baseline, a smaller peak than torch's). The torch ones skip without torch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_blocks(page: str) -> list[str]:
    """The ```python blocks of one docs page, in order."""
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_sequence_classification_beats_chance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load("sequence_classification").main(["--steps", "40", "--T", "12", "--hidden", "16"]) > 0.5


def test_timeseries_regression_beats_both_baselines(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mse, zero, repeat = load("timeseries_regression").main(["--steps", "60", "--T", "20", "--hidden", "16"])
    assert mse < repeat < zero


def test_torch_model_trains_above_chance(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    assert load("torch_model").main(["--steps", "60", "--T", "16"]) > 0.45


def test_torch_long_sequence_peaks_below_torch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    peaks = load("torch_long_sequence").main(["--T", "3000", "--budget-mb", "20"])
    assert 0 < peaks["gpubptt"] < peaks["torch"]
    assert "torch nn.LSTM peak" in capsys.readouterr().out


@pytest.mark.parametrize("page", ["heads.md", "torch.md"])
def test_docs_page_runs(page, tmp_path, monkeypatch):
    if page == "torch.md":
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    blocks = page_blocks(page)
    assert blocks
    namespace: dict = {}
    for code in blocks:
        exec(compile(code, f"docs/{page}", "exec"), namespace)
