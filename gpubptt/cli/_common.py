"""What the commands share: the app, the option choices (made from the library's own names), the
checks made before any work, and the way an error reaches the user (``error: ...``, an exit code)."""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import io
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from .. import __version__, plots
from .._paths import DestinationError, check_distinct, check_path, check_regular_file, check_writable, write_error
from ..backend import BACKEND_NAMES, Backend, get_backend
from ..backend.precision import PRECISIONS
from ..cells._jit import jit_choice, jit_in_use, jit_library
from ..engine.memory import format_bytes
from ..errors import BackendUnavailableError, InputError
from ..training.run import check_layers
from ..validation import DTYPES

#: ``-h`` beside ``--help`` on every command (a command's context inherits the group's help names)
HELP_NAMES = {"help_option_names": ["-h", "--help"]}


def _default_text(option: Any) -> str:
    """What ``(default: ...)`` shows for an option whose default Typer would print as ``[default: ...]``;
    "" where there is nothing to show (no default, or a flag that is off unless given)."""
    if isinstance(option.show_default, str):  # the command's own words for its default
        return option.show_default
    value = option.default
    if value is None or callable(value):
        return ""
    if isinstance(value, bool) and option.is_flag:
        if not value or not option.secondary_opts:
            return ""  # --force: off unless given, nothing to add
        return option.opts[0].lstrip("-")  # --bias/--no-bias on by default: "(default: bias)"
    return str(value.value if isinstance(value, Enum) else value)


class _HelpCommand(typer.core.TyperCommand):
    """A command whose ``--help`` is click's plain two-column layout, one default style, no ``<bool>``.

    Typer's rich panels split each option over five columns (names, short names, ``--no-x`` names,
    ``<type>``, help), which at 80 columns left the help text about 18 characters wide, printed
    ``<bool>`` beside flags, and added ``[default: x]`` to options whose help already says
    ``(default: x)``. Errors keep Typer's own formatting: only the help layout changes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for option in self.params:
            if not isinstance(option, typer.core.TyperOption) or not option.show_default:
                continue
            option.show_default = False  # one style: the "(default: x)" the help texts write themselves
            shown = _default_text(option)
            if shown and "(default:" not in (option.help or ""):
                option.help = f"{option.help} (default: {shown})" if option.help else f"(default: {shown})"

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super(typer.core.TyperCommand, self).format_help(ctx, formatter)  # click's layout, not the rich panels

    def get_help_option(self, ctx: Any) -> Any:
        return _help_answered(super().get_help_option(ctx))


class _HelpGroup(typer.core.TyperGroup):
    """The group's ``--help`` in the same plain layout as its commands' (``_HelpCommand``)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super(typer.core.TyperGroup, self).format_help(ctx, formatter)

    def get_help_option(self, ctx: Any) -> Any:
        return _help_answered(super().get_help_option(ctx))


def _help_answered(option: Any) -> Any:
    """The ``--help`` option, its printing answered as a result's is (``stdout_failure``): a stdout that cannot
    be written is one ``error:`` line and exit 1, not an OS traceback; a closed one (``>&-``) too."""
    if option is None or getattr(option, "_answered", False):
        return option
    show = option.callback

    def answered(ctx: Any, param: Any, value: Any) -> Any:
        if value and sys.stdout is None:
            raise stdout_failure(StdoutFailed(OSError(errno.EBADF, "stdout is closed")))
        try:
            return show(ctx, param, value)
        except OSError as exc:
            raise stdout_failure(StdoutFailed(exc)) from exc

    option.callback, option._answered = answered, True
    return option


class _App(typer.Typer):
    """A Typer app whose commands are ``_HelpCommand`` with ``-h``, unless a command asks otherwise."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _HelpCommand)
        kwargs.setdefault("context_settings", HELP_NAMES)
        return super().command(*args, **kwargs)


app = _App(
    add_completion=False,
    no_args_is_help=True,
    cls=_HelpGroup,
    context_settings=HELP_NAMES,
    help="Batched RNNs and exact BPTT on NumPy or CuPy.",
)


def choices(name: str, values: Iterable[str]) -> Any:
    """A str Enum for a Typer option whose members are the library's own names (``--backend [auto|numpy|cupy]``)."""
    return Enum(name, {v: v for v in values}, type=str)


BackendChoice = choices("BackendChoice", BACKEND_NAMES)
PrecisionChoice = choices("PrecisionChoice", PRECISIONS)
DtypeChoice = choices("DtypeChoice", DTYPES)


def _print_version(value: bool) -> None:
    if value:
        try:
            echo_out(f"gpubptt {__version__}")
        except StdoutFailed as exc:
            raise stdout_failure(exc) from exc
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def usage_error(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit(2) to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def check_plot(plot: Path | None) -> None:
    """--plot must name a .png in an existing folder, and matplotlib must import: checked before any work."""
    if plot is None:
        return
    if plot.suffix.lower() != ".png":
        raise usage_error(f"--plot must name a .png file, got {str(plot)!r}")
    _path_or_exit(check_path, plot, "--plot")  # a name too long or a looping link: before looking at its folder
    if not plot.parent.is_dir():
        raise usage_error(f"--plot: folder {str(plot.parent)!r} does not exist")
    if reason := plots.plot_unavailable_reason():
        raise usage_error(reason)


class StdoutFailed(Exception):
    """Writing results to stdout failed (a full disk, ``> /dev/full``, a reader that is gone).

    ``kept`` says what was saved all the same (train's checkpoint), and ``code`` is then
    ``EXIT_SAVED_NO_STDOUT``; otherwise the exit code is 1.
    """

    def __init__(self, error: OSError, kept: str = "", code: int = 1) -> None:
        super().__init__(error.strerror or str(error))
        self.error, self.kept, self.code = error, kept, code


#: The exit code of a command whose files were written (train's checkpoint, bench's --output) but whose
#: report on stdout could not be: the work is saved, only what it printed is lost.
EXIT_SAVED_NO_STDOUT = 3


def echo_out(message: str = "", nl: bool = True) -> None:
    """``typer.echo`` of a result to stdout; StdoutFailed when stdout cannot be written (``stdout_errors``), closed
    (``>&-``: Python's stdout is then None, and an echo would drop the result without a word) included."""
    if sys.stdout is None:
        raise StdoutFailed(OSError(errno.EBADF, "stdout is closed"))
    try:
        typer.echo(message, nl=nl)
    except OSError as exc:
        raise StdoutFailed(exc) from exc


def _silence_stdout() -> None:
    """Point stdout's descriptor at the null device: what is still buffered then cannot fail again at exit."""
    _point_at_null(sys.stdout)


def _point_at_null(stream: Any) -> None:
    """Point ``stream``'s descriptor at the null device (nothing where it has none: a test's capture)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)


def stdout_errors(command):
    """Answer a stdout that cannot be written with one ``error:`` line on stderr, no traceback.

    Exit 1, or ``StdoutFailed.code`` (3 when the command's files were saved). A reader that went away
    (``gpubptt ... | head``) ends the command quietly with exit 1, as a closed pipe usually does.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except StdoutFailed as exc:
            raise stdout_failure(exc) from exc

    return run


def stdout_failure(exc: StdoutFailed) -> typer.Exit:
    """Say that stdout could not be written (``error: could not write to stdout: ...``, and what was kept;
    nothing for a reader that went away); return the Exit to raise."""
    _silence_stdout()
    if not isinstance(exc.error, BrokenPipeError):
        kept = f"; {exc.kept}" if exc.kept else ""
        typer.echo(f"error: could not write to stdout: {exc}{kept}", err=True)
    return typer.Exit(exc.code)


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (a progress bar then), False where it is closed (``2>&-``: None)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, OSError, ValueError):
        return False


class StderrProxy(io.TextIOBase):
    """A text stream that writes through ``stream`` (stderr) and answers for it: its terminal, descriptor,
    encoding and error handler. Subclasses add what they do with each write."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return self.stream.isatty()
        return False

    def fileno(self) -> int:
        return self.stream.fileno()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.stream, "errors", None)


class _SparedStderr(StderrProxy):
    """sys.stderr whose failures end nothing: progress and notes are not results, so a run whose stderr is
    gone (``2>/dev/full``, ``2>&1 | head -1``) goes on silently. At the first failure stderr's descriptor
    is pointed at the null device, so that what is still buffered cannot fail again (at exit neither)."""

    def write(self, s: str) -> int:
        try:
            return self.stream.write(s)
        except OSError:
            self._silence()
            return len(s)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError:
            self._silence()

    def _silence(self) -> None:
        _point_at_null(self.stream)
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()


def settle_streams() -> None:
    """Before a command runs (the console script): text that stdout's or stderr's encoding cannot hold
    (ρ, ∂, × under ``PYTHONIOENCODING=latin-1``) is written as ``\\u03c1`` escapes, not a UnicodeEncodeError;
    stderr's failures end nothing (``_SparedStderr``); a closed stderr (``2>&-``) becomes the null device,
    which also keeps its descriptor from being reused by a file the command writes."""
    for stream in (sys.stdout, sys.stderr):  # a stream with its own handler (surrogateescape under C) keeps it
        with contextlib.suppress(AttributeError, OSError, ValueError):
            if stream.errors == "strict":
                stream.reconfigure(errors="backslashreplace")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # stderr for the whole process
    elif not isinstance(sys.stderr, _SparedStderr):
        sys.stderr = _SparedStderr(sys.stderr)


def backend_or_exit(name: str) -> Backend:
    """The backend called ``name``, or ``error: ...`` (why it cannot run here) and exit 2."""
    try:
        be = get_backend(name)
        # GPUBPTT_JIT checked up front, as GPUBPTT_BLAS is; numba itself is imported where it runs, unless asked
        # for by name: then here, so that a missing numba is this error, not a traceback in the first gated step
        if jit_choice() == "numba" and be.name == "numpy":
            jit_in_use()
        return be
    except (BackendUnavailableError, InputError) as exc:
        raise usage_error(str(exc)) from exc


def jit_or_exit(backend_name: str) -> str:
    """What runs the gated cells' step kernels on the backend (``GPUBPTT_JIT``), or ``error: ...`` and exit 2."""
    try:
        return jit_library(backend_name)
    except (BackendUnavailableError, InputError) as exc:
        raise usage_error(str(exc)) from exc


class Failed(Exception):
    """Work that failed for a reason the user can act on: printed as ``error: ...``, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(Exception):
    """Ctrl-C was pressed; raised between two training steps, where the run is consistent."""


def install_sigint(handler):
    """Make ``handler`` answer SIGINT; return what to restore (None where signals cannot be set: a thread)."""
    try:
        return (signal.signal(signal.SIGINT, handler),)
    except ValueError:  # not the main thread: Ctrl-C stays a KeyboardInterrupt
        return None


def restore_sigint(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGINT, previous[0])


def _path_or_exit(check: Any, path: Path | None, option: str) -> Path | None:
    if path is None:
        return None
    try:
        return check(path, option)
    except DestinationError as exc:
        raise usage_error(str(exc)) from exc


def writable_or_exit(path: Path | None, option: str) -> Path | None:
    """``path`` once a file can be written there (see ``check_writable``), else a usage error."""
    return _path_or_exit(check_writable, path, option)


def distinct_or_exit(outputs: dict[str, Path | None], inputs: dict[str, Path | None] | None = None) -> None:
    """A usage error when two outputs (stdout redirected to a file among them), or an output and an input,
    are one file after links and ``..`` (see ``check_distinct``): checked before any work."""
    try:
        check_distinct(outputs, inputs)
    except DestinationError as exc:
        raise usage_error(str(exc)) from exc


def layers_or_exit(layers: int | None) -> None:
    """A usage error for more --layers than a checkpoint holds (``run.check_layers``, the same everywhere)."""
    try:
        check_layers(layers)
    except InputError as exc:
        raise usage_error(str(exc)) from exc


# library argument names in messages that reach the command line, and the flags that set them
_FLAGS = (
    ("(on_nonfinite='skip')", "(--on-nonfinite skip)"),
    ("on_nonfinite", "--on-nonfinite"),
    ("max_norm", "--clip"),
    ("hidden_size", "--hidden"),
    ("batch_size", "--batch"),
    ("eval_every", "--eval-every"),
    ("max_memory", "--max-memory"),
)


def in_flags(message: str) -> str:
    """``message`` with the library's argument names replaced by the flags (``max_norm`` → ``--clip``).

    Whole names only: a path such as 'run_hidden_size_64.npz' in the message stays as it is.
    """
    for name, flag in _FLAGS:
        message = re.sub(rf"(?<![\w./-]){re.escape(name)}(?![\w.])", flag, message)
    return message


def reflowed_help(command):
    """Join the lines of each docstring paragraph, so ``--help`` wraps whole paragraphs to the terminal.

    Typer's rich help keeps the docstring's own line breaks and wraps each line again, which at
    80 columns cut sentences into ragged fragments ("the table gives the" / "spectral norm ...").
    """
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    command.__doc__ = "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)
    return command


def quiet_numerics(command):
    """Run ``command`` with NumPy's floating-point RuntimeWarnings off: overflow and NaN are reported
    by the command itself (a refused or skipped step, ``inf`` in a table), not as warnings from NumPy's
    internals."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return command(*args, **kwargs)

    return run


def out_of_memory(exc: MemoryError, be: Backend) -> typer.Exit:
    """'error: ran out of memory ...' with what the backend has left; exit 1 (nothing was written)."""
    avail = be.available_memory()
    left = "" if avail is None else f" ({format_bytes(avail)} available now on {be.name})"
    detail = f": {exc}" if str(exc) else ""
    typer.echo(f"error: ran out of memory{detail}{left}; try smaller sizes", err=True)
    return typer.Exit(1)


def readable_or_exit(path: Path | None, option: str) -> Path | None:
    """``path`` unless it names a folder, a device or a pipe (``/dev/zero`` would never end), else a usage error."""
    return _path_or_exit(check_regular_file, path, option)


def write_png(path: Path, what: str, draw) -> None:
    """Run ``draw(path)`` (a ``plots`` function: it writes atomically); Failed on an OSError."""
    try:
        draw(path)
    except OSError as exc:
        raise Failed(write_error(what, path, exc)) from exc


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str, flag: str) -> int:
    """'8G' → 8·2^30 bytes; suffixes K, M, G, T (powers of 1024, an optional trailing B or iB), or plain bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = s[-1:] if s[-1:] in _SIZE_UNITS else ""
    try:
        value = float(s[: len(s) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise usage_error(f"{flag} must be a size such as 512M, 8G or 1000000 (bytes), got {text!r}") from None
    if not (value >= 1 and value < float("inf")):
        raise usage_error(f"{flag} must be a positive size such as 512M or 8G, got {text!r}")
    return int(value)
