"""``python -m gpubptt`` runs the command line."""

from .cli import main

main()
