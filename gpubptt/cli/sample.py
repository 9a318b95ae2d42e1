"""``gpubptt sample``: draw text from a trained character model; ``--which`` (last or best), shared with vanish."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from ..errors import InputError
from ..training.record import CheckpointError, load_checkpoint
from ..training.run import best_path
from ..training.sample import sample_chars
from ._common import (
    StdoutFailed,
    app,
    distinct_or_exit,
    echo_out,
    quiet_numerics,
    readable_or_exit,
    reflowed_help,
    stdout_errors,
    usage_error,
)


class WhichChoice(str, Enum):
    """Which of a run's two checkpoints: the last model (the file named) or the best held-out one beside it."""

    last = "last"
    best = "best"


def which_checkpoint(checkpoint: Path, which: WhichChoice) -> Path:
    """The file ``--which`` selects, checked readable: ``checkpoint`` itself (last) or its best file (best)."""
    if which is WhichChoice.last:
        readable_or_exit(checkpoint, "--checkpoint")
        return checkpoint
    best = best_path(checkpoint)
    try:
        there = best.exists()
    except OSError as exc:  # a name the file system refuses (too long): say it as any path option's problem
        raise usage_error(f"--which best: {str(best)!r}: {exc.strerror or exc}") from None
    if not there:
        raise usage_error(
            f"--which best: {str(best)!r} does not exist (`gpubptt train --checkpoint {checkpoint}` writes it at the "
            "first held-out evaluation after training began); use --which last for the last model"
        )
    readable_or_exit(best, "--checkpoint's best file")
    return best


WHICH_HELP = "last: the --checkpoint file itself; best: the best held-out model saved beside it (ck.best.npz)."


@app.command()
@stdout_errors
@quiet_numerics
@reflowed_help
def sample(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint of a text model (from `gpubptt train`).")] = Path(
        "checkpoint.npz"
    ),
    which: Annotated[WhichChoice, typer.Option(help=WHICH_HELP)] = WhichChoice.last,
    length: Annotated[int, typer.Option(help="Characters to generate.")] = 500,
    temperature: Annotated[
        float, typer.Option(help="Softmax temperature: < 1 surer, > 1 more random; 0: greedy.")
    ] = 1.0,
    top_k: Annotated[
        int | None, typer.Option(min=1, help="Draw among the K most likely characters only. (default: all)")
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="Draw among the fewest most likely characters whose probability reaches P (0 < P ≤ 1)."),
    ] = None,
    greedy: Annotated[
        bool, typer.Option("--greedy", help="Take the most likely character every step (as --temperature 0).")
    ] = False,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the sampler (an int ≥ 0).")] = 0,
    prime: Annotated[str, typer.Option(help="Text to start from (its characters must be in the vocabulary).")] = "",
) -> None:
    """Generate text from a trained character model, printed to stdout as each character is drawn."""
    checkpoint = which_checkpoint(checkpoint, which)
    distinct_or_exit({}, {"--checkpoint": checkpoint})  # `>> ck.npz` would append the text to the checkpoint
    if length < 0:
        raise usage_error(f"--length must be ≥ 0, got {length}")
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise usage_error(f"--temperature must be a number ≥ 0 (0: greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise usage_error(f"--top-p must be a number in (0, 1], got {top_p}")
    if greedy or temperature == 0:  # the argmax every step: a temperature or a cut would not apply
        tau = temperature if greedy and temperature not in (0, 1) else None
        cuts = {"--temperature": tau, "--top-k": top_k, "--top-p": top_p}
        if given := [f"{k} {v:g}" for k, v in cuts.items() if v is not None]:
            mode = "--greedy" if greedy else "--temperature 0"
            raise usage_error(f"{mode} takes the most likely character every step; {', '.join(given)} would not apply")
    try:
        ck = load_checkpoint(checkpoint, backend="numpy")
        if ck.vocab is None:
            kind = (ck.data or {}).get("kind", "unknown")
            raise usage_error(f"{str(checkpoint)!r} was trained on the {kind} task; sampling needs a text model")
        chars = sample_chars(
            ck.model, ck.vocab, length=length, temperature=temperature, seed=seed, prime=prime, top_k=top_k,
            top_p=top_p, greedy=greedy,
        )  # fmt: skip
    except (InputError, CheckpointError) as exc:  # every argument is checked before the first character
        raise usage_error(str(exc)) from exc
    n = 0
    try:
        for ch in chars:
            echo_out(ch, nl=False)  # flushed: the text appears as it is drawn
            n += len(ch)
        echo_out("")
    except KeyboardInterrupt as exc:
        typer.echo("")
        typer.echo(f"interrupted after {n} of {len(prime) + length} characters", err=True)
        raise typer.Exit(130) from exc
    except StdoutFailed as exc:  # `| head` ends quietly (stdout_errors); a full disk is named
        exc.kept = f"stopped after {n} of {len(prime) + length} characters"
        raise
