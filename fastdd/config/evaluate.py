"""The configs of ``fastdd evaluate``, ``report`` and ``inspect``: the training protocol of the evaluation networks
and the measurements (OOD, robustness, calibration) made on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastdd.config.options import Section, field_error, field_of, option, pick, redefault
from fastdd.config.run import OUTPUT, ProgressConfig
from fastdd.config.sections import DeviceConfig, check_folder_exists
from fastdd.config.trust import DEFAULT_MASK_RATIO

# --mask-ratio auto: real training images held out to choose the ratio on, by default.
DEFAULT_CALIBRATION_VAL = 500

PROTOCOL, OOD, ROBUSTNESS, CALIBRATION, TRAINING, DATA, RANKING = (
    "Protocol", "OOD detection", "Robustness", "Calibration", "Training objective", "Data", "DD-Ranking scores",
)
DEFAULT_LR = 0.01


def _models() -> tuple[str, ...]:
    from fastdd.models import MODELS

    return MODELS


def _scores() -> tuple[str, ...]:
    from fastdd.evaluate.ood import SCORES

    return SCORES


def _robustness_sets() -> tuple[str, ...]:
    from fastdd.evaluate.robustness import ROBUSTNESS_SETS

    return ROBUSTNESS_SETS


def _calibrations() -> tuple[str, ...]:
    from fastdd.evaluate.calibration_runs import CALIBRATIONS

    return CALIBRATIONS


def _train_losses() -> tuple[str, ...]:
    from fastdd.trust.train_losses import TRAIN_LOSSES

    return TRAIN_LOSSES


@dataclass
class EvalConfig(DeviceConfig):
    """How each evaluation network is trained (defaults: the protocol of the DC/DSA/MTT papers). The learning rate
    is multiplied by 0.1 from epoch ``epochs // 2 + 1`` on."""

    runs: int = option(5, "Fresh networks per model (and set).", panel=PROTOCOL, at_least=1)
    epochs: int | None = option(None, "Training epochs.", panel=PROTOCOL, at_least=1,
                                default_text="1000 with DSA, 300 without")
    lr: float | None = option(None, "Learning rate.", panel=PROTOCOL, above=0,
                              default_text=f"the set's learned lr, else {DEFAULT_LR}")
    momentum: float = option(0.9, "SGD momentum.", panel=PROTOCOL, at_least=0, below=1)
    weight_decay: float = option(5e-4, "SGD weight decay.", panel=PROTOCOL, at_least=0)
    batch_size: int = option(256, "Minibatch size.", panel=PROTOCOL, at_least=1)
    dsa: bool = option(True, "Augment while training on the synthetic set.", panel=PROTOCOL, flag="--dsa/--no-dsa")
    seed: int = option(0, "Seed of the evaluation generator (the same for every set).", panel=PROTOCOL)

    def epochs_or_default(self) -> int:
        return self.epochs if self.epochs is not None else (1000 if self.dsa else 300)

    def lr_for(self, synset: Any) -> float:
        """The learning rate of the networks trained on ``synset`` (a SyntheticSet): ``lr``, else its learned
        ``syn_lr``, else 0.01."""
        if self.lr is not None:
            return self.lr
        return float(synset.syn_lr) if synset.syn_lr is not None else DEFAULT_LR


@dataclass
class EvalDataConfig(Section):
    """What the evaluation networks train and are tested on."""

    models: str = option("convnet", "Models to train, comma separated or repeated (several: cross-architecture).",
                         panel=DATA, choices=_models, split=True)
    data_root: str | None = option(None, "Dataset folder.", panel=DATA, default_text="the one used to distill")
    use_outliers: bool = option(True, "Train on the outlier images of TrustDD sets too, when they have them.",
                                panel=DATA, flag="--use-outliers/--ignore-outliers")

    def check_fields(self) -> None:
        check_folder_exists(self, "data_root")


@dataclass
class OODConfig(Section):
    """OOD detection on the test set against OOD sets."""

    ood: str | None = option(
        None, "OOD test sets, comma separated or repeated: gaussian, uniform, a dataset name (its test split), a "
        "folder of images, or holdout:K (train on classes < K, the other classes are OOD).", panel=OOD, split=True,
        default_text="none",
    )
    scores: str | None = option(None, "OOD scores, comma separated or repeated.", panel=OOD, flag="--score",
                                choices=_scores, split=True, default_text="msp (TrustDD's); energy with OAL")
    ood_size: int | None = option(None, "At most N images per side and OOD set.", panel=OOD, at_least=1,
                                  default_text="ID:OOD 1:1, all of the smaller side")


@dataclass
class RobustnessEvalConfig(Section):
    robustness: bool = option(
        False, "Also report cluster_min, cluster_mean (10 KMeans test clusters), and the accuracy under noise "
        "(Gaussian, std 0.0707), blur (Gaussian, radius 2) and invert (1 - x).", panel=ROBUSTNESS,
        flag="--robustness/--no-robustness",
    )
    robustness_sets: str | None = option(
        None, "Only these robustness measures, comma separated or repeated (implies --robustness).",
        panel=ROBUSTNESS, choices=_robustness_sets, split=True, default_text="all",
    )

    def chosen_robustness(self) -> list[str] | None:
        """The robustness measures to make, or None."""
        if self.robustness_sets:
            return self.robustness_sets.split(",")
        return list(_robustness_sets()) if self.robustness else None


@dataclass
class CalibrationEvalConfig(Section):
    calibration: str | None = option(
        None, "Calibration methods, comma separated or repeated: none (raw networks), ts (one more network per run "
        "trained on 90 % of S per class, temperature fitted on the other 10 %), mts (masked temperature scaling: "
        "temperature fitted on all of S, each image under 10 random masks). Reports ECE (--ece-bins bins), NLL, "
        "temperature and accuracy.", panel=CALIBRATION, choices=_calibrations, split=True, default_text="none",
    )
    mask_ratio: float | None = option(
        None, "Fraction of pixels MTS masks (0 = temperature scaling on S), or auto: per network, the ratio of "
        "0.1, 0.2, ..., 0.9 whose temperature gives the lowest ECE on --calibration-val held-out real training images "
        "(never the test set).", panel=CALIBRATION, at_least=0, below=1, default_text=str(DEFAULT_MASK_RATIO),
        words=("auto",),
    )
    calibration_val: int | None = option(
        None, "--mask-ratio auto: real training images held out, drawn at random from the training split, to choose "
        "the ratio on.", panel=CALIBRATION, at_least=1, default_text=str(DEFAULT_CALIBRATION_VAL),
    )
    mask_unit: str = option(
        "pixel", "What MTS masks: pixel (exactly round(r*H*W) pixels per image, all channels) or element (every value "
        "of every channel independently with probability r, as the calibration authors' rand_like(x) > r).",
        panel=CALIBRATION, choices=("pixel", "element"),
    )
    mts_fit: str = option(
        "fastdd", "How MTS fits T: fastdd (L-BFGS with line search on log T from 1, T kept in [0.01, 100]) or authors "
        "(their code: T from 1.5, L-BFGS lr 0.01, at most 50 iterations, no line search).", panel=CALIBRATION,
        choices=("fastdd", "authors"),
    )
    ece_bins: int = option(15, "Equal-width confidence bins of the ECE (the calibration authors use 10).",
                           panel=CALIBRATION, at_least=1)

    def check_fields(self) -> None:
        if self.calibration_val is not None and self.mask_ratio != "auto":
            raise field_error(field_of(self, "calibration_val"), "only applies with --mask-ratio auto")


@dataclass
class TrainObjectiveConfig(Section):
    train_loss: str = option("ce", "Loss of the evaluation networks: ce, ls (label smoothing 0.1), mixup, focal.",
                             panel=TRAINING, choices=_train_losses)
    train_plugin: str | None = option(
        None, "oal: train with OAL (CE + distillation from --teacher + MICL on boundary outliers); its default OOD "
        "score is energy.", panel=TRAINING, choices=("oal",), default_text="none",
    )
    teacher: str | None = option(
        None, "OAL's teacher: a folder from `fastdd teacher`, 'expert' (the experts folder the set was distilled "
        "from), an experts folder, an expert file or a model checkpoint (.safetensors, .pt).", panel=TRAINING,
        default_text="none",
    )
    init: str | None = option(
        None, "Start every evaluation network from this trained network instead of random weights (the fine-tune "
        "setting of OAL's paper): a folder from `fastdd teacher`, or anything --teacher takes; it must be the "
        "evaluation model with the same classes.", panel=TRAINING, default_text="random weights",
    )
    oal_kl: str = option(
        "student-teacher", "OAL's distillation direction: student-teacher (KL(student || teacher), the paper's "
        "equation as written) or teacher-student (KL(teacher || student), what the authors' code computes).",
        panel=TRAINING, choices=("student-teacher", "teacher-student"),
    )
    oal_recipe: str = option(
        "fastdd", "OAL's parts: fastdd (phi and the outlier projection Linear-ReLU-Linear; CLUB's q trained by its own "
        "Adam steps on its likelihood; boundary outliers searched once over all classes) or authors (their code: phi "
        "BatchNorm-Linear-ReLU-BatchNorm, q reads the outliers unprojected and trains in the network's optimiser on "
        "the loss, lr 1e-4; outliers searched per class: k 300, 50 anchors, 1,500 candidates each, 2 kept, 1,000 per "
        "class, scaled to the class's mean feature norm).", panel=TRAINING, choices=("fastdd", "authors"),
    )
    oal_beta: float = option(
        0.1, "OAL's MICL weight (beta); 0 trains with the distillation terms only (IDKD).", panel=TRAINING,
        at_least=0,
    )


@dataclass
class LabelScoresConfig(Section):
    label_scores: bool = option(
        False, "DD-Ranking's label-robust scores with this protocol: HLR (full-data minus hard-label accuracy), IOR "
        "(hard-label minus random-subset accuracy), LRS (both combined, in [0, 100]); one more network per run on "
        "random real images (cached), one more on arg-max labels for a soft-label set.", panel=RANKING,
        flag="--scores/--no-scores", recorded_at_default=False,
    )
    scores_full: str | None = option(
        None, "A `fastdd teacher` folder of the evaluation model: its test accuracy is the full-data accuracy, and "
        "the random-subset accuracies are cached in it.", panel=RANKING,
        default_text="runs/teacher-DATASET-MODEL, trained there with fastdd teacher's defaults when missing",
    )

    def check_fields(self) -> None:
        if self.scores_full is not None and not self.label_scores:
            raise field_error(field_of(self, "scores_full"), "only applies with --scores")


@dataclass
class EvaluationSettings(LabelScoresConfig, TrainObjectiveConfig, CalibrationEvalConfig, RobustnessEvalConfig,
                         OODConfig, EvalDataConfig, EvalConfig):
    """One evaluation of a synthetic set (`fastdd.evaluate.plan_evaluation`): the protocol, the models, and the
    measurements (OOD detection, robustness, calibration) with the plots they draw."""

    plots: str | None = option(
        None, "Folder for PNGs: histograms of the ID vs OOD scores (ood_MODEL_SCORE.png) with --ood; reliability "
        "diagrams (calibration_MODEL_METHOD.png) and max-logit histograms (max_logits_MODEL.png) with --calibration.",
        panel=OUTPUT, default_text="none",
    )

    @property
    def protocol(self) -> EvalConfig:
        """The training protocol alone."""
        return pick(EvalConfig, self)


@dataclass
class EvaluateConfig(ProgressConfig, EvaluationSettings):
    """``fastdd evaluate``: one evaluation and where its results go."""

    json_out: str | None = option(None, "Also write the results to this JSON file.", panel=OUTPUT, flag="--json",
                                  default_text="none")


@dataclass
class ReportConfig(ProgressConfig, LabelScoresConfig, CalibrationEvalConfig, RobustnessEvalConfig, OODConfig,
                   EvalDataConfig, EvalConfig):
    """``fastdd report``: sets of one dataset under one protocol, side by side (every measurement on by default)."""

    out: str | None = option(None, "Report folder: report.md, report.json, summary_MODEL.png, plots/.",
                             panel=OUTPUT, default_text="none: required")
    overwrite: bool = option(False, "Replace an earlier report in --out.", panel=OUTPUT,
                             flag="--overwrite/--no-overwrite")
    ood: str | None = redefault(OODConfig, "ood", "gaussian,uniform")  # built offline for every dataset
    scores: str | None = redefault(OODConfig, "scores", "msp,energy")
    robustness: bool = redefault(RobustnessEvalConfig, "robustness", True)
    calibration: str | None = redefault(CalibrationEvalConfig, "calibration", "none,ts,mts",
                                        help="Calibration methods, comma separated or repeated; ts is skipped, with a "
                                        "note, for a set with a single image in a class.")

    def check_fields(self) -> None:
        if self.out is None:
            raise field_error(field_of(self, "out"), "is needed: the folder the report is written into")


@dataclass
class InspectConfig(ProgressConfig, EvalConfig):
    """``fastdd inspect``: the SVD curve of each set and the max logits of networks trained on it."""

    runs: int = redefault(EvalConfig, "runs", 1, help="Fresh networks per set; their test-set max logits are pooled.")
    model: str | None = option(None, "Architecture to train.", panel=DATA, choices=_models,
                               default_text="the one the set was distilled with, else convnet")
    data_root: str | None = redefault(EvalDataConfig, "data_root", None)
    no_train: bool = option(False, "Only the SVD curves: train no networks.", panel=PROTOCOL,
                            flag="--no-train/--train")
    plots: str | None = option(
        None, "Folder for svd.png (the SVD curves of all sets, with the diagonal) and max_logits.png (histograms of "
        "their max logits; not with --no-train).", panel=OUTPUT, default_text="none",
    )
    json_out: str | None = option(None, "Also write the results (and full curves) to this JSON file.", panel=OUTPUT,
                                  flag="--json", default_text="none")
