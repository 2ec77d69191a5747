"""Config sections of a run's files and side channels: output folder, checkpoints, progress, logging, processes."""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, option

OUTPUT, LOGGING, PERFORMANCE = "Output", "Logging", "Performance"
DEFAULT_IMAGES_EVERY = 50
DEFAULT_CHECKPOINT_MINUTES = 10.0


@dataclass
class ProgressConfig(Section):
    quiet: bool = option(False, "No progress bar.", panel=OUTPUT, flag="--quiet/--progress")


@dataclass
class ProcessesConfig(Section):
    nproc: int | None = option(
        None, "Run as N local processes with torch.distributed (Gloo on CPU, NCCL with --device cuda), as `torchrun "
        "--nproc_per_node N` would; same result as one process.", panel=PERFORMANCE, at_least=1,
        default_text="1, or torchrun's",
    )


@dataclass
class LoggingConfig(Section):
    """Where the run's scalars and image grids go besides ``metrics.jsonl``."""

    tensorboard: bool = option(
        False, "Also write TensorBoard event files (into --tensorboard-dir): every numeric field of the metrics "
        "records as a scalar and the image grids. Needs `pip install tensorboard`.", panel=LOGGING,
        flag="--tensorboard/--no-tensorboard",
    )
    tensorboard_dir: str | None = option(None, "Folder of the TensorBoard event files; implies --tensorboard.",
                                         panel=LOGGING, default_text="OUT/tensorboard")
    wandb: bool = option(
        False, "Also log the same scalars and image grids to Weights & Biases (needs the wandb package; WANDB_MODE "
        "sets the mode, default offline: files in OUT/wandb, upload later with `wandb sync`).", panel=LOGGING,
        flag="--wandb/--no-wandb",
    )

    def tensorboard_target(self) -> str | bool | None:
        """The TensorBoard folder, True for the run's default one, or None when TensorBoard is off."""
        if self.tensorboard_dir is not None:
            return self.tensorboard_dir
        return True if self.tensorboard else None


@dataclass
class DistillRunConfig(ProcessesConfig, LoggingConfig, ProgressConfig):
    """How ``fastdd distill`` runs and what it writes, beside the method's settings."""

    out: str | None = option(None, "Output folder.", panel=OUTPUT, default_text="runs/METHOD-DATASET-ipcIPC")
    checkpoint_every: int = option(100, "Write checkpoint.pt and the synthetic set every K iterations.",
                                   panel=OUTPUT, at_least=1)
    checkpoint_minutes: float = option(
        DEFAULT_CHECKPOINT_MINUTES, "Also checkpoint when this many minutes have passed since the last checkpoint "
        "(and after a first iteration of a minute or more), so slow runs always have something recent to --resume.",
        panel=OUTPUT,
        above=0,
    )
    resume: bool = option(False, "Continue the run saved in --out.", panel=OUTPUT, flag="--resume/--no-resume")
    overwrite: bool = option(False, "Replace an earlier run saved in --out.", panel=OUTPUT,
                             flag="--overwrite/--no-overwrite")
    log_images_every: int = option(
        DEFAULT_IMAGES_EVERY, "With --tensorboard or --wandb: log the synthetic-image grid (and the outlier grid) "
        "every K iterations and at the end.", panel=LOGGING, at_least=1,
    )


@dataclass
class ExpertsRunConfig(ProcessesConfig, LoggingConfig, ProgressConfig):
    """Where ``fastdd experts`` writes, beside the training settings."""

    out: str | None = option(None, "Output folder.", panel=OUTPUT, default_text="runs/experts-DATASET-MODEL-HASH")
