"""``fastdd distill``: options -> a method config and a run config -> :func:`fastdd.distill.job.distill`."""

from __future__ import annotations

import time
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
from fastdd.errors import FastddError
from fastdd.progress import format_seconds


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
    given_method = merged.pop("method", None)
    method_name = str(given_method or "dsa")
    method_options, run_options = split_for(merged, method_config(method_name), DistillRunConfig)
    run = from_options(DistillRunConfig, run_options, context="fastdd distill")
    if run.resume:
        method_name, method_options = _with_stored_settings(given_method, method_options, run)
    config_class = method_config(method_name)
    settings = config_class.from_options(method_options, method=config_class.method)
    from fastdd.distill.job import check_before_start, output_folder
    from fastdd.distill.job import distill as distill_job

    check_before_start(settings, run)  # before the (possibly slow) data loading
    started = time.perf_counter()
    if run_job(distill_job, (settings, run), nproc=run.nproc):
        out = output_folder(settings, run)
        typer.echo(f"synthetic set written to {out} in {format_seconds(time.perf_counter() - started)}; "
                   f"next: fastdd evaluate {out}")


def _with_stored_settings(method: str | None, given: dict[str, Any], run: DistillRunConfig) -> tuple[str, dict]:
    """``--resume``: the settings stored in the run's folder, with ``given`` on top; a given option that differs
    from the stored one (other than ``--iterations``) is refused, naming both values."""
    from fastdd.distill.job import output_folder, stored_settings
    from fastdd.distill.runner import settings_differences

    if run.out is None:  # the default folder of the options given
        cls = method_config(method or "dsa")
        folder = output_folder(cls.from_options(given, method=cls.method), run)
    else:
        folder = Path(run.out)
    stored_run = stored_settings(folder)
    if stored_run is None:  # no synset.json: the runner tells whether a checkpoint can be continued
        return method or "dsa", given
    stored_method, stored = stored_run
    if method is not None and method_config(method).method != stored_method:
        raise FastddError(f"--method {method} was given but the run in {folder} is {stored_method}; drop --method "
                          "or choose another --out.")
    cls = method_config(stored_method)
    stored_config = cls.from_options({k: v for k, v in stored.items() if v is not None}, method=stored_method)
    wanted = cls.from_options({**stored_config.to_dict(), **given}, method=stored_method).to_dict()
    differences = settings_differences(stored_config.to_dict(), wanted)
    if differences:
        raise FastddError(f"the run in {folder} was made with other settings ({'; '.join(differences)}); "
                          "--resume takes them from the folder: drop the differing options (only --iterations may "
                          "change) or choose another --out.")
    return stored_method, {**stored_config.to_dict(), **given}
