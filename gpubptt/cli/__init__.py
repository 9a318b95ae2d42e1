"""The ``gpubptt`` command line: thin Typer commands that parse options and call the library.

One module per group of commands (``bench``: info and bench; ``vanish``; ``train``, with its reporting in
``_train_report``; ``sample``), and ``_common``: the app, the option choices made from the library's own
names, the checks made before any work, and how errors reach the user. Results go to stdout; progress and messages to
stderr.
"""

from __future__ import annotations

from . import bench, sample, train, vanish  # noqa: F401  (each module registers its commands on the app)
from ._common import app, settle_streams

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``gpubptt`` console script."""
    settle_streams()
    app()
