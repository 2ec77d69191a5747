"""DD-Ranking-style scores (`fastdd evaluate --scores`): the formula, the metric, the cache, the plan's own draws."""

import json

import numpy as np
import pytest
import torch

import fastdd.evaluate.plan as plan_module
from fastdd.config.evaluate import EvalConfig
from fastdd.config.teacher import TeacherConfig
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate import evaluate_synthetic_set
from fastdd.evaluate.label_scores import RANDOM_SUBSETS_FILE, LabelScoreMetric, label_robust_score
from fastdd.teacher_job import train_teacher
from real_synsets import real_image_synset

TINY = EvalConfig(runs=2, epochs=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    train_teacher(TeacherConfig(dataset="digits", epochs=1, width=8, out=str(folder), quiet=True))
    return folder


def test_lrs_is_ddrankings_formula_on_fractions():
    for hlr, ior in [(40.0, -3.0), (0.0, 0.0), (100.0, -100.0), (-5.0, 100.0), (12.5, 30.25)]:
        alpha = 0.5 * ior / 100 - 0.5 * hlr / 100  # DD-Ranking: accuracies as fractions
        expected = (np.exp(alpha) - np.exp(-1)) / (np.exp(1) - np.exp(-1))
        assert label_robust_score(hlr, ior) == pytest.approx(100 * expected, rel=1e-12)
    assert label_robust_score(100.0, -100.0) == pytest.approx(0.0, abs=1e-12)
    assert label_robust_score(-100.0, 100.0) == pytest.approx(100.0, rel=1e-12)


def test_metric_combines_per_run_accuracies():
    metric = LabelScoreMetric(torch.tensor([0, 1]), full_accuracy={"convnet": 90.0},
                              random_accuracy=lambda model, run: 0.0, hard_label_logits=None, source={})
    metric.reset()
    metric.start_model("convnet")
    for synthetic, random in [(60.0, 40.0), (70.0, 30.0)]:
        metric.update(synthetic, random)
    result = metric.compute()["label_scores"]
    assert result["hlr"]["runs"] == [30.0, 20.0] and result["ior"]["runs"] == [20.0, 40.0]
    assert result["lrs"]["runs"] == pytest.approx([label_robust_score(30, 20), label_robust_score(20, 40)])
    assert result["hlr"]["std"] == pytest.approx(5.0)  # population std, as DD-Ranking's np.std


def test_scores_use_own_draws_and_cache_random_subsets(digits, teacher, monkeypatch):
    synset = real_image_synset(digits, ipc=2)
    plain = evaluate_synthetic_set(synset, digits, config=TINY)
    scored = evaluate_synthetic_set(synset, digits, config=TINY, label_scores=True, scores_full=str(teacher))
    assert scored["models"]["convnet"]["acc"] == plain["models"]["convnet"]["acc"]  # the other networks unchanged
    scores = scored["models"]["convnet"]["label_scores"]
    full = json.loads((teacher / "network.json").read_text())["test_accuracy"]
    assert scores["acc_full"] == full
    assert scores["acc_hard"]["runs"] == plain["models"]["convnet"]["acc"]["runs"]  # hard labels: the same networks
    assert scores["hlr"]["runs"] == pytest.approx([full - a for a in scores["acc_hard"]["runs"]])
    assert scores["ior"]["runs"] == pytest.approx(
        [a - r for a, r in zip(scores["acc_hard"]["runs"], scores["acc_random"]["runs"])])
    cache = json.loads((teacher / RANDOM_SUBSETS_FILE).read_text())
    assert sorted(cache.values()) == sorted(scores["acc_random"]["runs"])

    def no_training(*args, **kwargs):
        raise AssertionError("a cached random subset was trained again")

    monkeypatch.setattr(plan_module.EvalPlan, "_scores_network", no_training)
    again = evaluate_synthetic_set(synset, digits, config=TINY, label_scores=True, scores_full=str(teacher))
    assert again["models"]["convnet"]["label_scores"] == scores


def test_soft_label_sets_are_scored_on_their_argmax_labels(digits, teacher, monkeypatch):
    synset = real_image_synset(digits, ipc=2)
    synset.soft_labels = torch.nn.functional.one_hot(synset.labels, 10).float() * 0.7 + 0.03
    calls = []
    original = plan_module.EvalPlan._scores_network

    def spy(self, model, kind, run, images, targets, lr):
        calls.append((kind, run, targets.clone()))
        return original(self, model, kind, run, images, targets, lr)

    monkeypatch.setattr(plan_module.EvalPlan, "_scores_network", spy)
    result = evaluate_synthetic_set(synset, digits, config=TINY, label_scores=True, scores_full=str(teacher))
    hard = [(run, targets) for kind, run, targets in calls if kind == "hard"]
    assert [run for run, _ in hard] == [0, 1]
    assert all(torch.equal(targets, synset.labels) for _, targets in hard)  # arg-max of the soft labels
    assert len(result["models"]["convnet"]["label_scores"]["acc_hard"]["runs"]) == 2


@pytest.mark.parametrize("keywords, message", [
    ({"scores_full": "x"}, "only applies with --scores"),
    ({"label_scores": True, "ood": "holdout:5"}, "holdout"),
    ({"label_scores": True, "models": "convnet,alexnet", "scores_full": "TEACHER"}, "one model at a time"),
    ({"label_scores": True, "models": "alexnet", "scores_full": "TEACHER"}, "holds a convnet"),
])
def test_scores_options_are_checked_before_any_training(digits, teacher, keywords, message):
    keywords = {k: (str(teacher) if v == "TEACHER" else v) for k, v in keywords.items()}
    with pytest.raises(FastddError, match=message):
        evaluate_synthetic_set(real_image_synset(digits, ipc=2), digits, config=TINY, **keywords)
