"""Evaluation of synthetic sets: the train-on-synthetic protocol, an evaluation as a plan (`plan_evaluation`, built
and checked once) plus a loop that feeds metric objects (accuracy, OOD detection, robustness, calibration), and the
trust report that compares synthetic sets under one protocol."""

from fastdd.evaluate.calibration import calibration_metrics, ece, nll
from fastdd.evaluate.calibration_runs import CALIBRATIONS, parse_calibrations
from fastdd.evaluate.ood import METRICS, SCORES, ood_metrics, ood_score
from fastdd.evaluate.metrics import (
    AccuracyMetric,
    CalibrationMetric,
    EvalMetric,
    OodDetectionMetric,
    RobustnessMetric,
    TrainedNetwork,
)
from fastdd.evaluate.options import EvalOptions, check_evaluation_options, evaluation_settings
from fastdd.evaluate.plan import EvalPlan, evaluate_synthetic_set, plan_evaluation
from fastdd.evaluate.protocol import EvalConfig, dataset_for_synset, train_on_synthetic
from fastdd.evaluate.report import prepare_report, trust_report
from fastdd.evaluate.robustness import ROBUSTNESS_SETS, cluster_accuracies, parse_robustness_sets

__all__ = [
    "CALIBRATIONS",
    "METRICS",
    "ROBUSTNESS_SETS",
    "SCORES",
    "AccuracyMetric",
    "CalibrationMetric",
    "EvalConfig",
    "EvalMetric",
    "EvalOptions",
    "EvalPlan",
    "OodDetectionMetric",
    "RobustnessMetric",
    "TrainedNetwork",
    "calibration_metrics",
    "check_evaluation_options",
    "evaluation_settings",
    "cluster_accuracies",
    "dataset_for_synset",
    "ece",
    "evaluate_synthetic_set",
    "nll",
    "ood_metrics",
    "ood_score",
    "parse_calibrations",
    "parse_robustness_sets",
    "plan_evaluation",
    "prepare_report",
    "train_on_synthetic",
    "trust_report",
]
