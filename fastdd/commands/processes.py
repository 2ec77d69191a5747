"""Running a command's library job in this process, or in ``--nproc N`` local processes (as torchrun would)."""

from __future__ import annotations

import os
from typing import Any, Callable

import typer

from fastdd.commands.errors import exit_status_of
from fastdd.errors import FastddError

# The options given before the command (``fastdd --threads 1 --nproc 2 distill``), set by the app's callback.
GLOBAL_OPTIONS: dict[str, Any] = {}


def run_job(job: Callable[..., Any], args: tuple, *, nproc: int | None) -> bool:
    """Run ``job(*args)`` here (one process, or one process of a torchrun group), or start ``nproc`` processes that
    each run it and wait for them. Returns True where the command should print its closing lines (the launcher,
    a single process, or rank 0 of a torchrun group)."""
    from fastdd.distill import distributed

    if nproc is None:
        nproc = GLOBAL_OPTIONS.get("nproc")
    launched = distributed.launched_world_size()
    if launched is not None:
        if nproc is not None and nproc != launched:
            raise FastddError(f"--nproc {nproc} was given but this process is one of {launched} started by torchrun; "
                              "drop --nproc under torchrun.")
        job(*args)
        return distributed.launched_rank() == 0
    if nproc is None or nproc == 1:
        job(*args)
        return True
    threads = GLOBAL_OPTIONS.get("threads")
    if threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // nproc)  # share the cores, as torchrun does
    try:
        distributed.launch(exit_status_of, (job, *args), nproc=nproc, threads=threads)
    except distributed.LaunchFailed as exc:
        if exc.exit_code == 1:  # not a reported user error: show what failed
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code)
    return True
