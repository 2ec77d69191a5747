"""``python -m fastdd`` runs the command line."""

from fastdd.cli import main

if __name__ == "__main__":  # not when a process started by --nproc imports the parent's main module
    main()
