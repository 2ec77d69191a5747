"""The distillation configs: :class:`DistillConfig` composed from the concern sections, and one subclass per method.

A method config changes defaults with :func:`~fastdd.config.options.redefault` and adds its own fields; its
``check_fields`` holds the rules that need no dataset (the distiller checks the rest against the loaded data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fastdd.config.experts import DEFAULT_NUM_EXPERTS
from fastdd.config.options import (
    ConfigError,
    Section,
    check_config,
    field_error,
    field_of,
    from_options,
    option,
    recorded_settings,
    redefault,
)
from fastdd.config.sections import (
    AugmentationConfig,
    DataConfig,
    DeviceConfig,
    ModelConfig,
)
from fastdd.config.trust import MDTConfig, OutliersConfig, RobustConfig

METHOD = "Method"
INITS = ("real", "noise")


@dataclass
class SyntheticSetConfig(Section):
    """What is learned and how the images are optimised."""

    ipc: int = option(10, "Synthetic images per class.", panel=METHOD, at_least=1)
    iterations: int = option(1000, "Outer iterations.", panel=METHOD, at_least=0)
    seed: int = option(0, "Seed of the run's generator.", panel=METHOD)
    init: str = option("real", "Initialise from 'real' images or 'noise'.", panel=METHOD, choices=INITS)
    lr_img: float = option(0.1, "Learning rate of the images.", panel=METHOD, above=0)
    momentum_img: float = option(0.5, "Momentum of the image optimiser.", panel=METHOD, at_least=0, below=1)
    batch_real: int = option(256, "Real images per class per step.", panel=METHOD, at_least=1)
    robust_batch: int = option(
        256, "Real images per class in each network step on real data (--net-data real, and --robust).",
        panel=METHOD, at_least=1,
    )


@dataclass
class DistillConfig(
    DeviceConfig, MDTConfig, RobustConfig, OutliersConfig, AugmentationConfig, ModelConfig, DataConfig,
    SyntheticSetConfig,
):
    """Settings shared by every method, composed from the sections (fields read flat: ``config.ipc``).

    Method configs subclass it and change defaults or add fields. Build one with :meth:`from_options` (checked);
    the constructor alone does not check.
    """

    method: ClassVar[str] = ""

    @classmethod
    def from_options(cls, options: dict[str, Any], *, method: str) -> "DistillConfig":
        """A checked config from ``options`` (None values mean "use the default").

        Raises:
            ConfigError: an option that does not apply to ``method``, or a value it cannot take.
        """
        for name in ("mask_ratio", "mask_unit"):
            if options.get(name) is not None and not options.get("mdt"):
                raise field_error(field_of(cls, name), "sets the masking of --mdt; add --mdt or drop it")
        return from_options(cls, options, context=f"method {method!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values; the MDT fields only when ``mdt`` is on (absent means off)."""
        values = recorded_settings(self)
        if not values["mdt"]:
            # So a run without MDT keeps the settings record of versions before MDT (and resumes their checkpoints).
            del values["mdt"], values["mask_ratio"]
            values.pop("mask_unit", None)
        return values

    def resolved(self) -> "DistillConfig":
        """The config with defaults that depend on other fields filled in (methods with presets override this)."""
        return self

    def check_fields(self) -> None:
        if self.clusters is not None and self.clusters > self.ipc:
            raise field_error(field_of(self, "clusters"), f"must be between 1 and --ipc {self.ipc} (the centres are "
                              f"synthetic images of the class), got {self.clusters}")


DC_NET_DATA = ("synthetic", "real")
DM_NET_DATA = ("random", "real")
GRADIENT_DISTANCES = ("ours", "mse", "cos")
STUDENT_BATCHINGS = ("auto", "grouped", "sequential")


@dataclass
class GradientMatchingConfig(DistillConfig):
    """dc (and dsa): per-class gradient matching with an outer/inner loop schedule."""

    method: ClassVar[str] = "dc"
    dsa: bool = redefault(DistillConfig, "dsa", False)
    outer_loop: int | None = option(None, "dc/dsa: image updates per iteration.", panel=METHOD, at_least=1,
                                    default_text="by IPC")
    inner_loop: int | None = option(None, "dc/dsa: network epochs between image updates.", panel=METHOD,
                                    at_least=0, default_text="by IPC")
    lr_net: float = option(0.01, "dc/dsa/dm: learning rate of the network trained between image updates.",
                           panel=METHOD, at_least=0)
    batch_train: int = option(256, "dc/dsa: inner-loop batch size.", panel=METHOD, at_least=1)
    dis_metric: str = option("ours", "dc/dsa: gradient distance.", panel=METHOD, choices=GRADIENT_DISTANCES)
    net_data: str | None = option(
        None, "What the matching network trains on: dc/dsa 'synthetic' or 'real'; dm 'random' (a fresh untrained "
        "network per iteration) or 'real' (a kept network trained on real data, as in IDM).", panel=METHOD,
        choices=("synthetic", "real", "random"), default_text="dc/dsa synthetic, dm random; real with --robust",
    )
    net_steps: int | None = option(
        None, "Network steps on real data: dc/dsa per image update (by budget: the images of --inner-loop epochs on "
        "the synthetic set), dm per iteration.", panel=METHOD, at_least=1, default_text="by budget",
    )

    robust_schedule: str = option(
        "fastdd", "dc/dsa: how the matching network trains on real data between image updates. fastdd: --net-steps "
        "steps on un-augmented minibatches of --robust-batch real images per class. official (the group-robust "
        "authors' code): --outer-loop 2 and --inner-loop 2 unless given, and --inner-loop epochs, in shuffled "
        "minibatches of --batch-train each augmented again (dsa), over every class's augmented matching batch plus "
        "a fresh batch of --batch-real real images; implies --net-data real, with or without --robust.",
        panel=METHOD, choices=("fastdd", "official"), recorded_at_default=False,
    )

    def check_fields(self) -> None:
        _check_net_data(self, DC_NET_DATA, "the synthetic images")
        if self.robust_schedule == "official" and self.net_data not in (None, "real"):
            raise ConfigError(
                f"--robust-schedule official trains the matching network on real images, not {self.net_data!r}; "
                f"drop --net-data (config field net_data)."
            )


@dataclass
class DSAConfig(GradientMatchingConfig):
    """dsa: gradient matching with differentiable siamese augmentation."""

    method: ClassVar[str] = "dsa"
    dsa: bool = redefault(DistillConfig, "dsa", True)


@dataclass
class DMConfig(DistillConfig):
    """dm: distribution matching of embeddings."""

    method: ClassVar[str] = "dm"
    iterations: int = redefault(DistillConfig, "iterations", 20000)
    lr_img: float = redefault(DistillConfig, "lr_img", 1.0)
    net_data: str | None = redefault(GradientMatchingConfig, "net_data", None)
    net_steps: int = redefault(GradientMatchingConfig, "net_steps", 1)
    net_refresh: int = option(100, "dm with --net-data real: re-initialise the kept network every K iterations.",
                              panel=METHOD, at_least=1)
    lr_net: float = redefault(GradientMatchingConfig, "lr_net", 0.01)

    def check_fields(self) -> None:
        _check_net_data(self, DM_NET_DATA, "a fresh random network")


def _check_net_data(config: DistillConfig, allowed: tuple[str, ...], other: str) -> None:
    f = field_of(config, "net_data")
    if config.net_data is not None and config.net_data not in allowed:
        raise field_error(f, f"must be one of {', '.join(allowed)} for {config.method}, got {config.net_data!r}")
    if config.robust and config.net_data not in (None, "real"):
        raise ConfigError(f"--robust needs --net-data real (its clusters are real images grouped around the synthetic "
                          f"ones), not {config.net_data!r} ({other}); drop --net-data (config field net_data).")


@dataclass
class TrajectoryConfig(DistillConfig):
    """mtt / tesla / tesla-compat. Fields left at None take the preset for (dataset, ipc)
    (see :func:`~fastdd.distill.trajectory_presets.trajectory_preset`); an explicit value always wins."""

    method: ClassVar[str] = "mtt"
    iterations: int | None = redefault(DistillConfig, "iterations", None, default_text="the preset")  # type: ignore[assignment]
    lr_img: float | None = redefault(DistillConfig, "lr_img", None, default_text="the preset")  # type: ignore[assignment]
    zca: bool | None = redefault(DistillConfig, "zca", None, default_text="the preset")  # type: ignore[assignment]
    syn_steps: int | None = option(None, "mtt/tesla: student steps per iteration.", panel=METHOD, at_least=1,
                                   default_text="the preset")
    expert_epochs: int | None = option(None, "mtt/tesla: expert epochs to match.", panel=METHOD, at_least=1,
                                       default_text="the preset")
    max_start_epoch: int | None = option(None, "mtt/tesla: start epochs are drawn below it.", panel=METHOD,
                                         at_least=1, default_text="the preset")
    lr_lr: float | None = option(None, "mtt/tesla: learning rate of the student lr.", panel=METHOD, above=0,
                                 default_text="the preset")
    lr_teacher: float | None = option(None, "mtt/tesla: initial student lr.", panel=METHOD, above=0,
                                      default_text="the preset")
    momentum_lr: float = option(0.5, "mtt/tesla: momentum of the student-lr optimiser.", panel=METHOD, at_least=0,
                                below=1)
    batch_syn: int | None = option(None, "mtt/tesla: student minibatch.", panel=METHOD, at_least=1,
                                   default_text="all images")
    soft_labels: bool = option(False, "mtt/tesla: targets from the target expert's softmax.", panel=METHOD,
                               flag="--soft-labels/--hard-labels")
    students: int = option(1, "mtt/tesla: independent students per iteration; split over the processes of --nproc.",
                           panel=METHOD, at_least=1)
    keep_graphs: int = option(
        1, "tesla/tesla-compat: final student steps whose graphs the forward sweep keeps: each saves a forward and a "
        "backward per iteration at the memory of one step's graph.", panel=METHOD, at_least=1,
    )
    student_batching: str = option(
        "auto", "mtt/tesla: how a process computes its students: 'grouped' runs them as one grouped-convolution "
        "network (a ConvNet with --norm instancenorm or none; not with rows split over processes), 'sequential' one "
        "after another, 'auto' grouped on CUDA when it applies and a process has several students, sequential on the "
        "CPU (where grouping measured slower). Both give the same numbers up to float rounding.",
        panel=METHOD, choices=STUDENT_BATCHINGS, recorded_at_default=False,
    )
    experts: str | None = option(None, "mtt/tesla: folder of expert trajectories.", panel=METHOD,
                                 default_text="train and cache them beside --out")
    num_experts: int = option(DEFAULT_NUM_EXPERTS, "mtt/tesla: experts to train when --experts is not given.",
                              panel=METHOD, at_least=1)
    expert_train_epochs: int | None = option(None, "mtt/tesla: epochs per auto-trained expert.", panel=METHOD,
                                             at_least=1, default_text="max_start_epoch + expert_epochs")
    expert_batch: int = option(256, "mtt/tesla: minibatch of auto-trained experts.", panel=METHOD, at_least=1)
    expert_seed: int = option(0, "mtt/tesla: seed of auto-trained experts.", panel=METHOD)

    def check_fields(self) -> None:
        if self.student_batching == "grouped":
            from fastdd.models.registry import CONVNET_MODELS

            if self.model.lower() not in CONVNET_MODELS or self.norm == "batchnorm":
                raise field_error(
                    field_of(self, "student_batching"),
                    f"grouped runs the students as one grouped-convolution ConvNet, which needs --model "
                    f"{', '.join(CONVNET_MODELS)} with --norm instancenorm or none, not --model {self.model} --norm "
                    f"{self.norm}; use --student-batching sequential or auto",
                )
        if self.robust:
            raise field_error(
                field_of(self, "robust"),
                f"does not apply to {self.method}: its networks trained on real data are the experts, trained before "
                "any synthetic image exists, so there are no synthetic images to cluster the real ones around; use "
                "--robust with dc, dsa or dm",
            )

    def resolved(self) -> "TrajectoryConfig":
        """A checked copy with every None field that the preset knows filled in."""
        from fastdd.distill.trajectory_presets import trajectory_preset

        preset = trajectory_preset(self.dataset, self.ipc)
        values = self.to_dict()
        for key, value in preset.items():
            if key in values and values[key] is None:
                values[key] = value
        return check_config(type(self)(**values))


@dataclass
class TeslaConfig(TrajectoryConfig):
    method: ClassVar[str] = "tesla"


@dataclass
class TeslaCompatConfig(TrajectoryConfig):
    method: ClassVar[str] = "tesla-compat"


METHOD_CONFIGS: dict[str, type[DistillConfig]] = {
    cls.method: cls
    for cls in (GradientMatchingConfig, DSAConfig, DMConfig, TrajectoryConfig, TeslaConfig, TeslaCompatConfig)
}


def method_config(method: str) -> type[DistillConfig]:
    """The config class of ``method`` (any case, ``_`` for ``-``).

    Raises:
        ConfigError: an unknown method, with the known ones.
    """
    from fastdd.config.options import normalize_choice

    try:
        return METHOD_CONFIGS[normalize_choice(method)]
    except KeyError:
        raise ConfigError(f"--method must be one of {', '.join(METHOD_CONFIGS)}, got {method!r}.") from None
