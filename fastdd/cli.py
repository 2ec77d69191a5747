"""The ``fastdd`` command line: one Typer app whose commands live in :mod:`fastdd.commands`, one module each."""

from __future__ import annotations

import sys
from typing import Callable, Optional

import typer

from fastdd.commands.distill import distill
from fastdd.commands.errors import fail
from fastdd.commands.evaluate import evaluate
from fastdd.commands.experts import experts
from fastdd.commands.export import export
from fastdd.commands.import_set import import_set
from fastdd.commands.info import info
from fastdd.commands.inspect import inspect_command
from fastdd.commands.processes import GLOBAL_OPTIONS
from fastdd.commands.report import report
from fastdd.commands.show import show
from fastdd.commands.teacher import teacher

app = typer.Typer(
    name="fastdd",
    help="Fast, trustworthy dataset distillation: distill a labelled image dataset into a few synthetic images per "
    "class, then evaluate networks trained on them.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _help_of(command: Callable) -> tuple[str, str]:
    """``(help, short help)`` of a command from its docstring: paragraphs reflowed (the terminal wraps them, not the
    source's line breaks), and the first paragraph for the command list of ``fastdd --help``."""
    paragraphs = [" ".join(part.split()) for part in (command.__doc__ or "").split("\n\n") if part.strip()]
    return "\n\n".join(paragraphs), paragraphs[0] if paragraphs else ""


for _name, _command in (
    ("distill", distill), ("experts", experts), ("evaluate", evaluate), ("report", report), ("show", show),
    ("inspect", inspect_command), ("export", export), ("import", import_set), ("teacher", teacher), ("info", info),
):
    _help, _short = _help_of(_command)
    app.command(_name, help=_help, short_help=_short)(_command)

# Commands that can run as several processes (`--nproc N`, or under torchrun).
DISTRIBUTED_COMMANDS = ("distill", "experts")
# Commands whose work is long torch computation (they pick their threads from the free cores).
COMPUTING_COMMANDS = ("distill", "experts", "evaluate", "report", "inspect", "teacher")


@app.callback()
def _global_options(
    ctx: typer.Context,
    threads: Optional[int] = typer.Option(
        None,
        "--threads",
        help="Torch CPU threads for the command (default for distill, experts, evaluate, report, inspect and teacher: "
        "one per core that other processes leave free, measured for a quarter second at start; else torch's, one per "
        "core).",
    ),
    nproc: Optional[int] = typer.Option(
        None,
        "--nproc",
        help="distill and experts: run as N local processes with torch.distributed (Gloo on CPU, NCCL with "
        "--device cuda, one GPU each), as `torchrun --nproc_per_node N` would; same result as one process.",
    ),
) -> None:
    if threads is not None and threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if threads is None and GLOBAL_OPTIONS.get("from_main") and ctx.invoked_subcommand in COMPUTING_COMMANDS:
        threads = _threads_for_shared_machine()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if nproc is not None and nproc < 1:
        fail(f"--nproc must be at least 1, got {nproc}")
    if nproc is not None and nproc != 1 and ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS:
        fail(f"--nproc applies to {' and '.join(DISTRIBUTED_COMMANDS)}, not to {ctx.invoked_subcommand}")
    GLOBAL_OPTIONS.update(threads=threads, nproc=nproc)


def _threads_for_shared_machine() -> int | None:
    """Fewer torch threads when other processes keep cores busy (one note says so); None leaves torch's choice."""
    from fastdd.runtime import threads_for_free_cores

    chosen = threads_for_free_cores()
    if chosen is None:
        return None
    threads, cores = chosen
    typer.echo(f"note: other processes keep {cores - threads} of this process's {cores} cores busy; using {threads} "
               "torch thread(s) (--threads N chooses)", err=True)
    return threads


def main() -> None:
    """Entry point of the ``fastdd`` script."""
    from fastdd.runtime import keep_freed_memory

    keep_freed_memory()
    GLOBAL_OPTIONS.clear()
    # A real command line (not a test's CliRunner, not --help): threads follow the free cores.
    GLOBAL_OPTIONS["from_main"] = not {"--help", "-h"} & set(sys.argv[1:])
    app()


if __name__ == "__main__":
    sys.exit(main())
