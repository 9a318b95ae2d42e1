"""The package's layout, checked: one direction of imports, CuPy named only by the backend, plots that
leave matplotlib's global state alone, and files that refer to nothing outside the repository."""

from __future__ import annotations

import ast
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
    for module in ("gpubptt.training", "gpubptt.cli"):  # the checkpoint format, data, the loop and run settings
        assert not [m for m in loaded if m == module or m.startswith(module + ".")]
    assert "gpubptt.diagnostics.problems" not in loaded and not [m for m in loaded if m.startswith("cupy")]
    # the builders are still one attribute away
    assert _run("from gpubptt import diagnostics as dg; print(dg.random_problem.__module__)") == (
        "gpubptt.diagnostics.problems"
    )


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name → (file, is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return found


def _imports(name: str, modules: dict[str, tuple[Path, bool]]) -> dict[str, set[str]]:
    """What module ``name`` imports, at any depth (in functions and under ``if TYPE_CHECKING:`` too):
    {"gpubptt": package modules, "other": top-level names of the rest}."""
    path, is_init = modules[name]
    package = name.split(".") if is_init else name.split(".")[:-1]
    found: dict[str, set[str]] = {"gpubptt": set(), "other": set()}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "gpubptt":
                # the deepest package module the dotted name names (an attribute's module for `import a.b.c`)
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    found["gpubptt"].add(target)
            else:
                found["other"].add(target.split(".")[0])
    return found


def test_the_module_graph_has_no_cycles_not_even_through_imports_inside_functions():
    modules = _modules()
    graph = {name: _imports(name, modules)["gpubptt"] for name in modules}
    # depth-first search: a back edge is a cycle; report it as the path that closes it
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(" → ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_nothing_below_the_cli_imports_the_cli_and_only_the_backend_and_nccl_import_cupy():
    modules = _modules()
    above = ("gpubptt.cli", "gpubptt.__main__")  # `python -m gpubptt` runs the CLI
    below_cli = [m for m in modules if not (m in above or m.startswith("gpubptt.cli."))]
    assert below_cli and len(below_cli) < len(modules)
    assert [m for m in below_cli if any(d.startswith("gpubptt.cli") for d in _imports(m, modules)["gpubptt"])] == []
    cupy_users = sorted(
        m for m in modules if {"cupy", "cupyx"} & _imports(m, modules)["other"] and not m.startswith("gpubptt.backend")
    )
    assert cupy_users == ["gpubptt.distributed.nccl"]


def test_the_checkpoint_file_format_imports_no_training_code():
    modules = _modules()
    graph = {name: _imports(name, modules)["gpubptt"] for name in modules}
    fmt = {"gpubptt.training.checkpoint", "gpubptt.training.checkpoint_meta"}
    reached, todo = set(), list(fmt)
    while todo:  # everything the file format imports, directly or not
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    training = {m for m in modules if m.startswith("gpubptt.training.")} - fmt
    assert "gpubptt.training.loop" in training and reached & training == set()
    # and the training record reaches the format only through it
    assert {"gpubptt.training.checkpoint", "gpubptt.training.checkpoint_meta"} <= graph["gpubptt.training.record"]


def test_every_module_imports_in_a_fresh_interpreter():
    names = [m for m in _modules() if m != "gpubptt.__main__"]  # __main__ runs the CLI
    # an optional extra that is not installed (torch, mpi4py, matplotlib, CuPy) may refuse; nothing else may
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name.split('.')[0] not in ('torch', 'mpi4py', 'matplotlib', 'cupy', 'cupyx'):\n"
        "            raise\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_only_the_backend_package_imports_or_branches_on_cupy():
    offenders = []
    # the NCCL communicator moves CuPy buffers and may import CuPy, but only inside a function: importing it
    # (and gpubptt.distributed) never imports CuPy
    lazy = {PACKAGE / "distributed" / "nccl.py"}
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
        "from gpubptt import plots; from gpubptt.training.loop import History\n"
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
