"""``fastdd distill``: options -> a method config and a run config -> :func:`fastdd.distill.job.distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from fastdd.commands.errors import user_errors
from fastdd.commands.options import (
    config_file_option,
    given_options,
    split_for,
    with_config_options,
)
from fastdd.commands.processes import run_job
from fastdd.config import METHOD_CONFIGS, method_config
from fastdd.config.distill import METHOD
from fastdd.config.options import from_options
from fastdd.config.run import DistillRunConfig


@user_errors
@with_config_options(METHOD_CONFIGS, DistillRunConfig)
def distill(
    method: Optional[str] = typer.Option(
        None, "--method", help="Distillation method. (default: dsa)", rich_help_panel=METHOD, show_default=False,
        metavar="[" + "|".join(METHOD_CONFIGS) + "]",
    ),
    config: Optional[Path] = config_file_option(),
    **options: Any,
) -> None:
    """Distill a dataset into IPC synthetic images per class and save them in OUT."""
    merged = given_options(config, {"method": method, **options})
    config_class = method_config(str(merged.pop("method", "dsa")))
    method_options, run_options = split_for(merged, config_class, DistillRunConfig)
    settings = config_class.from_options(method_options, method=config_class.method)
    run = from_options(DistillRunConfig, run_options, context="fastdd distill")
    from fastdd.distill.job import check_before_start, output_folder
    from fastdd.distill.job import distill as distill_job

    check_before_start(settings, run)  # before the (possibly slow) data loading
    if run_job(distill_job, (settings, run), nproc=run.nproc):
        typer.echo(f"synthetic set written to {output_folder(settings, run)}")
