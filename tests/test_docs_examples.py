"""Every code example of README.md and docs/*.md runs as written, in a temporary folder, and writes nothing
into the repository.

What runs. Every fenced block opened by a line ```` ```python ```` or ```` ```sh ```` at the start of a line
(an indented fence of either kind fails the test: it would otherwise be skipped silently).

- ``python`` blocks: all blocks of one page run in order in one namespace (one test per page), the
  current folder a fresh temporary one, each assertion of the example being the example's own. A long
  training run in an example is shortened by the text substitutions in ``SMALLER_PY`` (documented text →
  what runs; each must occur somewhere, so the table cannot rot).
- ``sh`` blocks: one test per block; every line (a trailing ``# comment`` dropped) is one command. A
  ``gpubptt ARGS`` line runs in this process through Typer's ``CliRunner`` (no interpreter start per
  command) with the flags that ``SMALLER_SH`` lists for its subcommand appended: the command line
  keeps the last value of an option given twice, so an appended ``--steps 6`` replaces a documented
  ``--steps 5000``. Each command must exit 0. Any other command (``make``, ``pip``, ``mpiexec``,
  ``python benchmarks/...``) fails the test unless its block is marked, as below.
- The temporary folder holds an empty ``benchmarks/`` (the commands that draw the committed figures
  write there, not into the repository) and a small ``book.txt`` (the documented ``--data book.txt``).
  ``GPUBPTT_BACKEND`` is ``numpy``: ``backend=None`` runs on the CPU (the CLI's ``--backend auto``, as the
  library's ``"auto"``, does not read it: on a machine with a GPU the documented commands run on CuPy).

A block that cannot run here (a GPU, NCCL, a package index, the test suite itself) is skipped only by
an explicit marker on the line just above its fence, ``<!-- no-test: REASON -->``; each such block is
a test of its own that skips with that reason, so every skipped example is listed in the summary.
A block that needs an optional package (torch) carries ``<!-- needs: torch -->`` above its fence: it
runs where the package imports and is skipped, listed the same way, where it does not (CI has no torch).

After every example, the repository's files (path, size and modification time, outside .git, .venv,
caches and the ignored site/) are compared with a snapshot taken before it: an example that writes
into the repository fails.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpubptt.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Documented text in a python block → what the test runs instead (a long run shortened).
SMALLER_PY = {
    "TrainConfig(steps=3000,": "TrainConfig(steps=12,",
    "RNN(data.input_size, 256,": "RNN(data.input_size, 32,",
    "diagnostics.vanish_report(model, x, y)": "diagnostics.vanish_report(model, x[:12, :4], y[:12, :4])",
}

# Flags appended to every documented `gpubptt SUBCOMMAND ...` line: small sizes, few steps, one repeat.
SMALLER_SH = {
    "train": ["--steps", "6", "--hidden", "16", "--batch", "4", "--chunk", "16", "--eval-every", "3"],
    "sample": ["--length", "40"],
    "vanish": ["--seq-len", "8", "--hidden", "8", "--batch", "2", "--iters", "20"],
    "bench": ["--seq-lens", "4,8", "--hidden-sizes", "8,16", "--batch", "2", "--warmup", "0", "--repeats", "1"],
    "info": [],
}
# A resumed run must go past the step its checkpoint reached (6 above); a checkpoint brings its own H.
SMALLER_RESUME = ["--steps", "12"]
RANDOM_MODEL_ONLY = {"--hidden", "--vocab"}

FENCE = re.compile(r"^```(python|sh)\b")
INDENTED_FENCE = re.compile(r"^\s+```(python|sh)\b")
NO_TEST = re.compile(r"^<!--\s*no-test:\s*(.+?)\s*-->\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*([\w.]+(?:\s*,\s*[\w.]+)*)\s*-->\s*$")
IGNORED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "site"}
BOOK = "It was a quiet night. The small birds slept, and the foxes ran home.\n" * 40


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    no_test: str | None  # the marker's reason, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def importable(name: str) -> bool:
    """Whether ``name`` can be imported here (found, not imported)."""
    return importlib.util.find_spec(name) is not None


def extract(page: Path) -> list[Block]:
    """The page's ```python and ```sh blocks, each with the no-test reason written just above it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if INDENTED_FENCE.match(lines[i]):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: an indented code fence; start it at column 0")
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        marker = NO_TEST.match(lines[i - 1]) if i > 0 else None
        needs = NEEDS.match(lines[i - 1]) if i > 0 else None
        missing = [] if needs is None else [n.strip() for n in needs.group(1).split(",") if not importable(n.strip())]
        reason = marker and marker.group(1)
        if missing:
            reason = f"needs {', '.join(missing)}, which is not installed here"
        blocks.append(Block(page, i + 1, m.group(1), "\n".join(lines[i + 1 : end]) + "\n", reason))
        i = end + 1
    return blocks


BLOCKS = [b for page in PAGES for b in extract(page)]
PY_PAGES = sorted({b.page for b in BLOCKS if b.lang == "python" and b.no_test is None})


def repo_files() -> dict[str, tuple[int, int]]:
    """Every file of the repository (outside .git, .venv, caches and site/) with its size and mtime."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in IGNORED_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath, name)
            st = path.stat()
            files[str(path.relative_to(ROOT))] = (st.st_size, st.st_mtime_ns)
    return files


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh folder to run examples in, with benchmarks/ and book.txt; the repository must not change."""
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "book.txt").write_text(BOOK, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUBPTT_BACKEND", "numpy")
    before = repo_files()
    yield tmp_path
    after = repo_files()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"an example wrote into the repository: {changed}"


def smaller_python(code: str) -> str:
    for documented, runs in SMALLER_PY.items():
        code = code.replace(documented, runs)
    return code


def gpubptt_args(line: str) -> list[str]:
    """The argument list a documented `gpubptt ...` line runs with: as written, then the smaller sizes."""
    args = shlex.split(line, comments=True)[1:]
    sub = args[0] if args and not args[0].startswith("-") else None
    extra = SMALLER_SH.get(sub, []) if sub else []
    if sub == "train" and "--resume" in args:
        extra = [*extra, *SMALLER_RESUME]
    if sub == "vanish" and "--checkpoint" in args:
        pairs = zip(extra[::2], extra[1::2], strict=True)
        extra = [word for flag, value in pairs if flag not in RANDOM_MODEL_ONLY for word in (flag, value)]
    if sub == "train" and any(a in ("copy", "recall") for a in args):  # tasks train whole sequences: no --chunk
        pairs = zip(extra[::2], extra[1::2], strict=True)
        extra = [word for flag, value in pairs if flag != "--chunk" for word in (flag, value)]
    if sub == "vanish" and "--cell" in args:  # dense Jacobians: no power iterations to cut short
        pairs = zip(extra[::2], extra[1::2], strict=True)
        extra = [word for flag, value in pairs if flag != "--iters" for word in (flag, value)]
    return [*args, *extra]


@pytest.mark.parametrize("page", PY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_of_a_page_run_in_order(page, workdir):
    namespace: dict = {"__name__": "__docs__"}
    for block in (b for b in BLOCKS if b.page == page and b.lang == "python" and b.no_test is None):
        exec(compile(smaller_python(block.code), block.where, "exec"), namespace)


SH_BLOCKS = [b for b in BLOCKS if b.lang == "sh" and b.no_test is None]


@pytest.mark.parametrize("block", SH_BLOCKS, ids=lambda b: b.where)
def test_shell_examples_run(block, workdir):
    runner = CliRunner()
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0] == "gpubptt", (
            f"{block.where}: {line.strip()!r} is not a gpubptt command; mark the block "
            "<!-- no-test: REASON --> if it cannot run in the tests"
        )
        args = gpubptt_args(line)
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (
            f"{block.where}: gpubptt {shlex.join(args)} exited {result.exit_code}:\n" + (result.output[-3000:])
        )


MARKED = [b for b in BLOCKS if b.no_test is not None]


@pytest.mark.parametrize("block", MARKED, ids=lambda b: b.where)
def test_marked_examples_are_listed_as_skipped(block):
    pytest.skip(f"example {block.where} not run: {block.no_test}")


def test_every_substitution_applies_somewhere():
    code = "".join(b.code for b in BLOCKS if b.lang == "python")
    unused = [documented for documented in SMALLER_PY if documented not in code]
    assert not unused, f"SMALLER_PY entries that match no example: {unused}"
