"""Config sections of the trust features that change what is distilled: outliers (TrustDD), robust (CVaR), MDT.

Each is owned by its plug-in in :mod:`fastdd.trust`; the defaults here are the only place their values are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastdd.config.options import Section, field_error, field_of, option

TRUST = "Trust"

OUTLIER_MODES = ("none", "oe", "poe")
DEFAULT_OUTLIER_WEIGHT = 0.5
CLUSTER_SPACES = ("pixel", "embed")
DEFAULT_CVAR_ALPHA = 0.8
DEFAULT_MASK_RATIO = 0.3


@dataclass
class OutliersConfig(Section):
    """TrustDD: outlier exposure (real outliers) or pseudo-outlier exposure (corrupted training images)."""

    outliers: str = option(
        "none", "TrustDD: also distill unlabelled outlier images against real outliers: none, oe (from "
        "--outlier-data) or poe (pseudo-outliers: jigsaw, invert, mosaic, speckle corruptions of the training images).",
        panel=TRUST, choices=OUTLIER_MODES,
    )
    outlier_data: str | None = option(
        None, "oe: a registered dataset name or a folder of images, converted to the dataset's shape.", panel=TRUST,
        default_text="none",
    )
    outlier_ratio: float = option(1.0, "Outlier images per synthetic (or training) image.", panel=TRUST, above=0)
    outlier_weight: float = option(
        DEFAULT_OUTLIER_WEIGHT, "lambda of the integrated loss CE(in) + lambda * H(U; f(out)).", panel=TRUST, at_least=0
    )

    def check_fields(self) -> None:
        if self.outliers == "oe" and not self.outlier_data:
            raise field_error(field_of(self, "outlier_data"),
                              "is needed by --outliers oe (a dataset name or a folder of outlier images)")
        if self.outlier_data and self.outliers != "oe":
            raise field_error(field_of(self, "outlier_data"),
                              f"is only used by outlier mode 'oe', not {self.outliers!r}; drop it or use --outliers oe")


@dataclass
class RobustConfig(Section):
    """Group-robust distillation: CVaR over clusters of real images around the synthetic ones."""

    robust: bool = option(
        False, "Group-robust distillation (dc, dsa, dm): the matching network trains on real images with CE + mean "
        "and max over clusters of CVaR, the clusters formed around the synthetic images of each class.",
        panel=TRUST, flag="--robust/--no-robust",
    )
    cvar_alpha: float = option(
        DEFAULT_CVAR_ALPHA, "--robust: CVaR level, the share of each cluster's worst losses averaged.", panel=TRUST,
        above=0, at_most=1,
    )
    clusters: int | None = option(
        None, "--robust: clusters per class, between 1 and --ipc.", panel=TRUST, at_least=1,
        default_text="IPC up to 10, else 10 chosen by farthest-point selection",
    )
    cluster_space: str = option(
        "embed", "--robust: distances for the clusters, 'embed' (the current network's features) or 'pixel'.",
        panel=TRUST, choices=CLUSTER_SPACES,
    )
    cvar_tail: str = option(
        "upper", "--robust: which losses a cluster's CVaR averages: upper (fastdd's: its ceil(alpha*n) largest, "
        "differentiable) or lower (the group-robust authors' released code: the trimmed mean of its int(alpha*n) "
        "smallest, at least one; made differentiable here, where their code detaches it).", panel=TRUST,
        choices=("upper", "lower"), recorded_at_default=False,
    )
    robust_assign: str = option(
        "class", "--robust: the synthetic images a real image may join: those of its own class (fastdd's) or of "
        "all classes (the authors' code).", panel=TRUST, choices=("class", "all"), recorded_at_default=False,
    )


@dataclass
class MDTConfig(Section):
    """Masked distillation training (paper 004)."""

    mdt: bool = option(
        False, "Masked distillation training (dc, dsa, mtt, tesla, tesla-compat; not dm, whose networks never train "
        "on the synthetic images): a fresh random mask zeroes --mask-ratio of the pixels of every synthetic image a "
        "network trained by the matching objective sees, after augmentation; a masked pixel is set to 0 (the dataset "
        "mean) in all channels. mtt/tesla: the student's minibatch at every step. dc/dsa: the synthetic batch in the "
        "gradient-matching loss (real images stay unmasked) and the inner-loop epochs on the synthetic set.",
        panel=TRUST, flag="--mdt/--no-mdt",
    )
    mask_ratio: float = option(
        DEFAULT_MASK_RATIO, "--mdt: share of each image's pixels zeroed, in [0, 1) (as --mask-ratio of MTS).",
        panel=TRUST, at_least=0, below=1,
    )
    mask_unit: str = option(
        "pixel", "--mdt: what is masked: pixel (exactly round(r*H*W) pixels per image, all channels) or element (every "
        "value of every channel independently with probability r, as the calibration authors' masks).",
        panel=TRUST, choices=("pixel", "element"), recorded_at_default=False,
    )
