"""Evaluation of synthetic sets: the train-on-synthetic protocol and its metrics."""

from fastdd.evaluate.protocol import (
    EvalConfig,
    dataset_for_synset,
    evaluate_synthetic_set,
    train_on_synthetic,
)

__all__ = ["EvalConfig", "dataset_for_synset", "evaluate_synthetic_set", "train_on_synthetic"]
