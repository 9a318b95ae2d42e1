"""Long commands say how far they are; sample streams; Ctrl-C in train saves; --version; whole --help."""

from __future__ import annotations

from typer.testing import CliRunner

from gpubptt.cli import app

runner = CliRunner()
VANISH = ["vanish", "--backend", "numpy", "--seq-len", "6", "--hidden", "5", "--batch", "2", "--vocab", "4"]


# -- vanish ------------------------------------------------------------------------------------------
def test_vanish_sweep_reports_each_stage_of_each_radius_through_a_callback():
    from gpubptt import diagnostics

    problem = diagnostics.random_problem(5, 4, 2, 3, backend="numpy", seed=0)
    calls = []
    diagnostics.vanish_sweep(
        problem.model, problem.x, problem.y, [0.5, None], iters=5, progress=lambda *a: calls.append(a)
    )
    stages = diagnostics.VANISH_STAGES
    assert [c[0] for c in calls] == list(range(2 * len(stages) + 1))
    assert all(c[1] == 2 * len(stages) for c in calls)
    assert calls[0][2] == f"ρ=0.5: {stages[0]}" and calls[len(stages)][2] == f"ρ=model: {stages[0]}"
    assert calls[-1][2] == "done"


def test_vanish_prints_one_progress_line_per_radius_on_stderr():
    result = runner.invoke(app, [*VANISH, "--scale", "0.5,2", "--format", "json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if " measured " in line]
    assert len(lines) == 2 and lines[0].startswith("vanish: ρ=0.5 measured (1/2, ")
    assert lines[1].startswith("vanish: ρ=2 measured (2/2, ")
    assert result.stdout.lstrip().startswith("{")  # stdout stays pure JSON
