"""``fastdd experts``: options -> an expert config and a run config -> :func:`fastdd.distill.experts_job.train`."""

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
from fastdd.config.experts import ExpertConfig
from fastdd.config.options import from_options
from fastdd.config.run import ExpertsRunConfig


def _train_and_report(config: ExpertConfig, run: ExpertsRunConfig) -> None:
    from fastdd.distill import distributed
    from fastdd.distill.experts_job import experts_folder, train

    def report(index: int, acc: float) -> None:
        typer.echo(f"expert {index}: test accuracy {100 * acc:.2f} %")

    try:
        result = train(config, run, on_expert=report)
    except KeyboardInterrupt:
        from fastdd.commands.errors import EXIT_INTERRUPTED, fail

        fail("interrupted; finished experts are kept: run the same command again to continue", EXIT_INTERRUPTED)
    if distributed.launched_rank() == 0:
        mean = 100 * sum(result.test_accuracies) / len(result.test_accuracies)
        typer.echo(f"{result.num_experts} experts with {result.num_snapshots} snapshots in "
                   f"{experts_folder(config, run)} (mean test accuracy {mean:.2f} %)")


@user_errors
@with_config_options(ExpertConfig, ExpertsRunConfig)
def experts(config: Optional[Path] = config_file_option(), **options: Any) -> None:
    """Train expert trajectories for mtt/tesla: one file of snapshots (init + every epoch) per expert.

    Run the same command again to continue an interrupted training or to add experts to the folder.
    """
    merged = given_options(config, options)
    settings_options, run_options = split_for(merged, ExpertConfig, ExpertsRunConfig)
    settings = from_options(ExpertConfig, settings_options, context="fastdd experts")
    run = from_options(ExpertsRunConfig, run_options, context="fastdd experts")
    from fastdd.distill.experts_job import check_before_start

    check_before_start(settings, run)  # before the (possibly slow) data loading
    run_job(_train_and_report, (settings, run), nproc=run.nproc)
