"""``python -m fastdd`` runs the command line."""

from fastdd.cli import main

main()
