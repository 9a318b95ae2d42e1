"""The ``gpubptt`` command line: thin Typer commands that parse options and call the library."""

from __future__ import annotations

import io
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from . import bench as bench_lib
from .backend import available_backends, get_backend
from .errors import BackendUnavailableError, InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Batched RNNs and exact BPTT on NumPy or CuPy.")


class BackendChoice(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"


def _backend_or_exit(name: str):
    try:
        return get_backend(name)
    except (BackendUnavailableError, InputError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


# -- gpubptt info / gpubptt bench ----------------------------------------------------------------
class BenchBackendChoice(str, Enum):
    auto = "auto"
    numpy = "numpy"
    cupy = "cupy"
    all = "all"


class InputChoice(str, Enum):
    tokens = "tokens"
    dense = "dense"


class DtypeChoice(str, Enum):
    float32 = "float32"
    float64 = "float64"


class CompareChoice(str, Enum):
    none = "none"
    torch = "torch"
    naive = "naive"


class FormatChoice(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for i, item in enumerate(v):
                out += _flat(item, f"{prefix}{k}[{i}].")
        else:
            out.append((f"{prefix}{k}", v))
    return out


@app.command()
def info(
    backend: Annotated[BackendChoice, typer.Option(help="Backend to describe.")] = BackendChoice.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the backend, device, library versions, BLAS build and thread counts."""
    be = _backend_or_exit(backend.value)
    env = bench_lib.environment([be])
    data = {
        "gpubptt": env["versions"]["gpubptt"],
        "python": env["python"],
        "numpy": env["versions"]["numpy"],
        "backend": be.name,
        "device": be.device,
        "backend_library": f"{be.xp.__name__} {be.xp.__version__}",
        "available_backends": available_backends(),
        "machine": env["machine"],
        "versions": env["versions"],
        "blas": env["blas"],
        "threads": env["threads"],
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    for k, v in _flat(data):
        typer.echo(f"{k:>32}: {'-' if v is None else v}")


def _sizes(value: str, option: str) -> list[int]:
    try:
        sizes = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{option} must be comma-separated positive ints (e.g. 16,32,64), got {value!r}")
    return sizes


def _out_path(path: Path | None, option: str) -> Path | None:
    if path is not None and (path.is_dir() or not path.parent.is_dir()):
        raise typer.BadParameter(f"{option} {str(path)!r} must be a file in an existing folder")
    return path


def _ms(summary: dict | None) -> str:
    return "-" if not summary else f"{summary['median_s'] * 1e3:.3g}"


def _bench_table(result: dict) -> str:
    """The result as readable text: a table per backend and sweep, then the fitted exponents."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    buf = io.StringIO()
    console = Console(file=buf, width=220, color_system=None, highlight=False)
    cfg = result["config"]
    for be in result["environment"]["backends"]:
        for sweep, fixed in (("T", f"H={cfg['fixed_H']}"), ("H", f"T={cfg['fixed_T']}")):
            rows = [r for r in result["rows"] if r["backend"] == be["name"] and r["sweep"] == sweep]
            title = (
                f"{be['name']} on {be['device']}: forward+BPTT vs {sweep} at {fixed}, B={cfg['batch']}, "
                f"D={cfg['D']}, K={cfg['K']}, {cfg['input']}, {cfg['dtype']} (median of {cfg['repeats']})"
            )
            table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
            cols = ["T", "H", "fwd+BPTT ms", "IQR ms", "min ms", "fwd ms", "tokens/s", "µs/step"]
            cols += ["GFLOP/s", "GEMM GFLOP/s", "eff"]
            refs = [ref for ref in ("torch", "naive") if any(ref in r for r in rows)]
            for ref in refs:
                cols += [f"{ref} ms", f"×{ref}", f"{ref} grad err"]
            for c in cols:
                table.add_column(c, justify="right")
            for r in rows:
                if r["status"] != "ok":
                    table.add_row(str(r["T"]), str(r["H"]), r["status"], *[""] * (len(cols) - 3))
                    continue
                b = r["bptt"]
                cells = [str(r["T"]), str(r["H"]), _ms(b), f"{b['iqr_s'] * 1e3:.2g}", f"{b['min_s'] * 1e3:.3g}"]
                cells += [_ms(r["forward"]), f"{r['tokens_per_s']:,.0f}", f"{r['us_per_step']:.1f}"]
                cells += [f"{r['gflops']:.1f}", f"{r['gemm']['gflops']:.1f}", f"{r['efficiency']:.0%}"]
                for ref in refs:
                    d = r.get(ref)
                    if d is None:
                        cells += ["-"] * 3
                        continue
                    err = max(d["grad_rel_err"].values())
                    cells += [_ms(d["bptt"]), f"{d['ratio']:.2f}", f"{err:.1e}" + ("" if d["grads_match"] else " (!)")]
                table.add_row(*cells)
            console.print(table)
        fits = [f for f in result["fits"] if f["backend"] == be["name"]]
        for f in fits:
            (k, v), exp = next(iter(f["fixed"].items())), f["exponent"]
            expo = "n/a (needs 2 sizes)" if exp is None else f"{exp:.2f}"
            console.print(f"fitted: {f['impl']:>8} [{be['name']}]  time ∝ {f['sweep']}^{expo}  at {k}={v}")
    for note in result["notes"]:
        console.print(f"note: {note}")
    console.print(
        "×torch / ×naive = reference time ÷ gpubptt time (above 1: gpubptt is faster); eff = GFLOP/s ÷ the "
        "same-shaped GEMM rate measured in this run"
    )
    return buf.getvalue()


def _render(result: dict, fmt: FormatChoice) -> str:
    if fmt is FormatChoice.json:
        return json.dumps(result, indent=2) + "\n"
    if fmt is FormatChoice.csv:
        return bench_lib.render_csv(result)
    return _bench_table(result)


@app.command()
def bench(
    backend: Annotated[
        BenchBackendChoice, typer.Option(help="Backend to measure; 'all' runs every backend available here.")
    ] = BenchBackendChoice.auto,
    seq_lens: Annotated[
        str, typer.Option(help="Sequence lengths T of the T sweep, comma-separated.")
    ] = "16,32,64,128,256,512",
    hidden_sizes: Annotated[
        str, typer.Option(help="Hidden sizes H of the H sweep, comma-separated.")
    ] = "32,64,128,256,512,1024",
    fixed_hidden: Annotated[
        int | None, typer.Option(min=1, help="H of the T sweep (default: the middle of --hidden-sizes).")
    ] = None,
    fixed_seq_len: Annotated[
        int | None, typer.Option(min=1, help="T of the H sweep (default: the middle of --seq-lens).")
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Batch size B.")] = 64,
    input: Annotated[
        InputChoice, typer.Option(help="tokens: (T, B) ids, one-hot (a gather); dense: (T, B, D) floats.")
    ] = InputChoice.tokens,
    vocab: Annotated[int, typer.Option(min=1, help="Vocabulary size: D = K for tokens (dense: default D, K).")] = 256,
    input_size: Annotated[int | None, typer.Option(min=1, help="D for --input dense (default: --vocab).")] = None,
    output_size: Annotated[int | None, typer.Option(min=1, help="K, the number of classes (default: --vocab).")] = None,
    dtype: Annotated[DtypeChoice, typer.Option(help="Floating-point type.")] = DtypeChoice.float32,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed runs before timing each configuration.")] = 2,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per configuration (median reported).")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the weights and data (fixed per configuration).")] = 0,
    compare: Annotated[
        CompareChoice,
        typer.Option(help="Also time a reference: torch (nn.RNN + Linear + cross_entropy) or naive (per example)."),
    ] = CompareChoice.none,
    format: Annotated[
        FormatChoice | None, typer.Option(help="Output format (default: from --output's suffix, else table).")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the result here (atomically) instead of stdout.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a log-log PNG of time vs T and vs H here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")] = False,
) -> None:
    """Time forward+BPTT as T grows (at fixed H) and as H grows (at fixed T).

    Each row: median/min/IQR time, tokens/s, µs per step, GFLOP/s and efficiency vs same-shaped GEMMs.

    At the end: the fitted exponents a, b of time ∝ T^a (fixed H) and time ∝ H^b (fixed T).
    """
    Ts = _sizes(seq_lens, "--seq-lens")
    Hs = _sizes(hidden_sizes, "--hidden-sizes")
    if input is InputChoice.tokens and input_size is not None:
        raise typer.BadParameter("--input-size applies to --input dense; with tokens D = --vocab")
    output, plot = _out_path(output, "--output"), _out_path(plot, "--plot")
    if format is None:
        suffix = output.suffix.lower().lstrip(".") if output else ""
        format = FormatChoice(suffix) if suffix in ("json", "csv") else FormatChoice.table

    def say(msg: str) -> None:
        if not quiet:
            typer.echo(msg, err=True)

    if plot is not None and (reason := bench_lib.plot_unavailable_reason()):
        typer.echo(f"error: {reason}", err=True)
        raise typer.Exit(1)
    requested = available_backends() if backend is BenchBackendChoice.all else [backend.value]
    names = list(dict.fromkeys(_backend_or_exit(name).name for name in requested))  # fails here, before any work
    if compare is CompareChoice.torch and (reason := bench_lib.torch_unavailable_reason()):
        typer.echo(f"warning: {reason}; continuing without the torch comparison", err=True)
        compare = CompareChoice.none
    cfg = bench_lib.BenchConfig(
        backends=names,
        seq_lens=Ts,
        hidden_sizes=Hs,
        batch=batch,
        input=input.value,
        D=input_size or vocab,
        K=output_size or vocab,
        dtype=dtype.value,
        warmup=warmup,
        repeats=repeats,
        seed=seed,
        compare=compare.value,
        fixed_T=fixed_seq_len,
        fixed_H=fixed_hidden,
    )
    say(f"gpubptt bench: backends {', '.join(names)}; T in {Ts} at H={cfg.fixed_H}, H in {Hs} at T={cfg.fixed_T}")
    argv = ["gpubptt", *sys.argv[1:]]
    if sys.stderr.isatty() and not quiet:
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("bench", total=None)

            def progress(desc: str, done: int, total: int) -> None:
                bar.update(task, description=desc, completed=done, total=total)

            result = bench_lib.run_bench(cfg, progress=progress, argv=argv)
    else:
        result = bench_lib.run_bench(cfg, argv=argv)
    for note in result["notes"]:
        say(f"note: {note}")
    if output is not None:
        bench_lib.write_atomic(output, _render(result, format))
        say(f"wrote {output}")
        if not quiet:
            typer.echo(_bench_table(result), nl=False)
    else:
        typer.echo(_render(result, format), nl=False)
    if plot is not None:
        bench_lib.plot_results(result, plot)
        say(f"wrote {plot}")


def main() -> None:
    """Entry point of the ``gpubptt`` console script."""
    app()
