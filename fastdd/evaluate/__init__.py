"""Evaluation of synthetic sets: the train-on-synthetic protocol and its metrics (accuracy, OOD detection,
robustness, calibration), and the trust report that compares synthetic sets under one protocol."""

from fastdd.evaluate.calibration import calibration_metrics, ece, nll
from fastdd.evaluate.calibration_runs import CALIBRATIONS, parse_calibrations
from fastdd.evaluate.ood import METRICS, SCORES, ood_metrics, ood_score
from fastdd.evaluate.protocol import (
    EvalConfig,
    dataset_for_synset,
    evaluate_synthetic_set,
    train_on_synthetic,
)
from fastdd.evaluate.report import prepare_report, trust_report
from fastdd.evaluate.robustness import ROBUSTNESS_SETS, cluster_accuracies, parse_robustness_sets

__all__ = [
    "CALIBRATIONS",
    "METRICS",
    "ROBUSTNESS_SETS",
    "SCORES",
    "EvalConfig",
    "calibration_metrics",
    "cluster_accuracies",
    "dataset_for_synset",
    "ece",
    "evaluate_synthetic_set",
    "nll",
    "ood_metrics",
    "ood_score",
    "parse_calibrations",
    "parse_robustness_sets",
    "prepare_report",
    "train_on_synthetic",
    "trust_report",
]
