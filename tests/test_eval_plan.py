"""An evaluation as a plan plus metric objects (`fastdd.evaluate.plan`, `fastdd.evaluate.metrics`): the metrics on
hand-made logits, the plan built once and reused (by `run` and by the trust report), and every check made before
anything expensive is built."""

import pytest
import torch

import fastdd.evaluate.plan as plan_module
import fastdd.evaluate.robustness as robustness_module
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate import (
    AccuracyMetric,
    CalibrationMetric,
    EvalConfig,
    OodDetectionMetric,
    RobustnessMetric,
    check_evaluation_options,
    evaluate_synthetic_set,
    plan_evaluation,
)
from fastdd.evaluate.calibration import calibration_metrics
from fastdd.evaluate.calibration_runs import CalibrationTask
from fastdd.evaluate.ood_sets import OodTestSet
from fastdd.config.evaluate import CalibrationEvalConfig
from fastdd.evaluate.options import EvalTask, evaluation_settings
from fastdd.evaluate.report import prepare_report
from fastdd.evaluate.robustness import RobustnessTests
from fastdd.evaluate.training_objectives import TrainingObjectives
from real_synsets import real_image_synset

TINY = EvalConfig(runs=2, epochs=2, batch_size=64)
OPTIONS = dict(ood="gaussian,uniform", scores="msp,energy", ood_size=40, robustness="cluster_min,noise,invert",
               calibration="none,ts,mts")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _synset(digits, ipc=2, seed=1):
    """A tiny set whose evaluation networks are width-8 ConvNets (the width of its distillation model)."""
    synset = real_image_synset(digits, ipc=ipc, seed=seed)
    synset.meta.update(model="convnet", hyperparameters={"width": 8})
    return synset


# ---------------------------------------------------------------------------------------------- metric objects


def test_accuracy_metric_summarises_the_runs_since_reset():
    labels = torch.tensor([0, 1, 2, 1])
    metric = AccuracyMetric(labels)
    metric.update(torch.eye(3)[[0, 1, 0, 1]])  # 3 of 4 right
    metric.update(torch.eye(3)[[0, 1, 2, 1]])  # all right
    assert metric.compute() == {"acc": {"mean": 87.5, "std": 12.5, "runs": [75.0, 100.0]}}
    metric.reset()
    metric.update(torch.eye(3)[[1, 1, 1, 1]])
    assert metric.compute()["acc"]["runs"] == [50.0]


def test_ood_metric_on_separable_and_on_identical_scores():
    confident = torch.tensor([[9.0, 0.0], [0.0, 9.0], [9.0, 0.0]])
    flat = torch.zeros(2, 2)
    metric = OodDetectionMetric(["msp"], {"far": OodTestSet(torch.zeros(2, 1, 1, 1), torch.tensor([0, 2]))})
    metric.update(confident, {"far": flat})  # every ID score above every OOD score
    metric.update(flat[:1].expand(3, 2), {"far": flat})  # all scores tied
    far = metric.compute()["ood"]["msp"]["far"]
    assert far["auroc"]["runs"] == [100.0, 50.0] and far["auroc"]["mean"] == 75.0 and far["auroc"]["std"] == 25.0
    assert far["fpr95"]["runs"] == [0.0, 100.0]
    assert metric.compute()["ood"]["msp"]["mean"] == far  # the mean over one set is that set
    assert metric.describe() == {"scores": ["msp"], "ood_sets": {"far": 2}}
    assert [t.shape[0] for t in metric.pooled_in["msp"]] == [3, 3]  # the histograms pool every run


def test_robustness_metric_from_clean_and_corrupted_logits():
    labels, clusters = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    tests = RobustnessTests(("cluster_min", "cluster_mean", "invert"), labels, clusters, 2,
                            {"invert": torch.zeros(4, 1, 2, 2)})
    metric = RobustnessMetric(tests)
    clean = torch.eye(2)[[0, 1, 1, 1]]  # cluster 0: 1 of 2 right, cluster 1: 2 of 2
    metric.update(clean, {"invert": torch.eye(2)[[1, 1, 1, 1]]})  # inverted: 2 of 4 right
    metric.update(torch.eye(2)[labels], {"invert": torch.eye(2)[labels]})
    robustness = metric.compute()["robustness"]
    assert robustness["cluster_min"]["runs"] == [50.0, 100.0] and robustness["cluster_mean"]["runs"] == [75.0, 100.0]
    assert robustness["invert"] == {"mean": 75.0, "std": 25.0, "runs": [50.0, 100.0]}
    assert metric.describe() == {"robustness_sets": ["cluster_min", "cluster_mean", "invert"], "cluster_sizes": [2, 2]}


def test_calibration_metric_of_raw_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    task = EvalTask(None, torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), torch.zeros(3, 1, 1, 1), labels, None)
    metric = CalibrationMetric(CalibrationTask.create(task, ("none",), seed=0, settings=CalibrationEvalConfig(mask_ratio=0.3)))
    metric.update(None, logits, None)  # raw networks: neither the network nor a retrainer is needed
    metric.update(None, logits * 2, None)
    none = metric.compute()["calibration"]["none"]
    expected = [calibration_metrics(logits, labels), calibration_metrics(logits * 2, labels)]
    for name in ("ece", "nll", "acc"):
        assert none[name]["runs"] == [row[name] for row in expected]
    assert none["temperature"]["runs"] == [1.0, 1.0]
    assert metric.describe() == {"calibration": ["none"], "mask_ratio": 0.3, "mask_unit": "pixel", "mts_fit": "fastdd",
                                 "ece_bins": 15}


# ------------------------------------------------------------------------------------------------------ the plan


def _count_builders(monkeypatch):
    """Count the calls of the OOD-set and robustness-test builders of the plan."""
    calls = {"ood": 0, "robustness": 0}

    def counted(name, builder):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return builder(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(plan_module, "build_ood_test_set", counted("ood", plan_module.build_ood_test_set))
    monkeypatch.setattr(plan_module, "build_robustness_tests",
                        counted("robustness", plan_module.build_robustness_tests))
    return calls


def test_plan_run_equals_evaluate_synthetic_set_and_builds_once(digits, monkeypatch):
    synset = _synset(digits)
    direct = evaluate_synthetic_set(synset, digits, models=["convnet"], config=TINY, **OPTIONS)
    calls = _count_builders(monkeypatch)
    plan = plan_evaluation(synset, digits, models=["convnet"], config=TINY, **OPTIONS)
    assert calls == {"ood": 2, "robustness": 1}
    epochs = []
    assert plan.run(lambda model, run, epoch: epochs.append((model, run, epoch))) == direct
    assert len(epochs) == plan.total_epochs == 2 * 2 * 2  # runs x (network + TS network) x epochs
    assert plan.run() == direct  # a plan runs again with fresh generators, and builds nothing more
    assert calls == {"ood": 2, "robustness": 1}
    assert set(direct["models"]["convnet"]) == {"acc", "ood", "robustness", "calibration"}


def test_report_checks_every_set_then_builds_each_test_side_once(digits, tmp_path, monkeypatch):
    sets = {"a": _synset(digits, seed=1), "b": _synset(digits, seed=2)}
    config = EvalConfig(runs=1, epochs=1, batch_size=64)
    options = dict(ood_size=30, robustness="cluster_min,noise", calibration="none")
    alone = [evaluate_synthetic_set(synset, digits, models=["convnet", "alexnet"], config=config,
                                    ood=["gaussian", "uniform"], scores=["msp", "energy"], **options)
             for synset in sets.values()]
    calls = _count_builders(monkeypatch)
    report = prepare_report(sets, out=tmp_path / "report", models="convnet,alexnet", config=config, **options)
    assert calls == {"ood": 2, "robustness": 1}  # gaussian and uniform, shared by the two sets of one dataset
    assert report.sets[0].plan.test_data is report.sets[1].plan.test_data
    assert report.total_epochs == 2 * 2 * 1
    fail = lambda *a, **k: pytest.fail("the report built a plan again")  # noqa: E731
    monkeypatch.setattr(plan_module, "build_ood_test_set", fail)
    monkeypatch.setattr(plan_module, "build_robustness_tests", fail)
    written = report.run()
    assert [{k: v for k, v in entry["results"].items() if k != "plots"} for entry in written["sets"]] == alone


# -------------------------------------------------------------------------------------------------- validation


def _nothing_expensive(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("something expensive was built before the options were checked")

    monkeypatch.setattr(plan_module, "build_ood_test_set", fail)
    monkeypatch.setattr(plan_module, "build_robustness_tests", fail)
    monkeypatch.setattr(robustness_module, "kmeans_clusters", fail)
    monkeypatch.setattr(TrainingObjectives, "create", fail)
    monkeypatch.setattr(plan_module, "train_on_synthetic", fail)


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(ood="gaussian", scores="msp,odin"), "--score must be one of msp, mls, energy, gen, got 'odin'"),
        (dict(ood="gaussian,holdout:10"), "holdout:10 is out of range"),
        (dict(ood="digits"), "cannot be an OOD set"),
        (dict(robustness="snow"), "--robustness-sets must be one of .* got 'snow'"),
        (dict(calibration="ts"), "single synthetic image"),
        (dict(calibration="mts", mask_ratio=1.0), "--mask-ratio must be less than 1"),
        (dict(train_loss="hinge"), "--train-loss must be one of ce, ls, mixup, focal, got 'hinge'"),
        (dict(train_plugin="oal", teacher="expert", ood="holdout:5"), "cannot train holdout:K"),
    ],
)
def test_options_are_checked_before_anything_is_built(digits, monkeypatch, options, fragment):
    _nothing_expensive(monkeypatch)
    options = {"ood": "gaussian", "robustness": "cluster_min,noise", **options}
    with pytest.raises(FastddError, match=fragment):
        plan_evaluation(_synset(digits, ipc=1), digits, models=["convnet"], **options)


def test_a_protocol_that_cannot_run_is_refused_when_made():
    with pytest.raises(FastddError, match="--runs must be at least 1"):
        EvalConfig(runs=0)
    with pytest.raises(FastddError, match="--lr must be greater than 0"):
        EvalConfig(lr=0.0)


def test_keyword_form_reaches_every_evaluation_option():
    """The library's keyword form takes what the command line takes: every field of EvaluationSettings is a
    keyword (or the protocol's config), so an option added to the config cannot be missing from the library."""
    import dataclasses
    import inspect

    from fastdd.config.evaluate import EvalConfig, EvaluationSettings
    from fastdd.evaluate.options import _OTHER_SETTINGS

    named = set(inspect.signature(evaluation_settings).parameters) - {"options", "config"}
    reachable = named | _OTHER_SETTINGS | {f.name for f in dataclasses.fields(EvalConfig)} | {"robustness_sets"}
    assert {f.name for f in dataclasses.fields(EvaluationSettings)} <= reachable
    settings = evaluation_settings(
        calibration="mts", mask_ratio="auto", calibration_val=40, mask_unit="element", mts_fit="authors", ece_bins=10,
        train_plugin="oal", teacher="expert", oal_kl="teacher-student", oal_recipe="authors", oal_beta=0.0,
    )
    assert (settings.mask_ratio, settings.calibration_val, settings.mask_unit, settings.mts_fit, settings.ece_bins) == (
        "auto", 40, "element", "authors", 10)
    assert (settings.oal_kl, settings.oal_recipe, settings.oal_beta) == ("teacher-student", "authors", 0.0)
    with pytest.raises(TypeError, match="unexpected keyword.*epochs"):
        evaluation_settings(epochs=3)
    with pytest.raises(FastddError, match="--mts-fit must be one of"):
        evaluation_settings(mts_fit="scipy")


def test_too_few_test_images_for_the_clusters_is_refused_before_clustering(digits, monkeypatch):
    _nothing_expensive(monkeypatch)
    synset = _synset(digits, ipc=1)
    synset.labels = torch.arange(10)
    small = load_dataset("digits")
    keep = torch.arange(5)
    small.test_images, small.test_labels = small.test_images[keep], small.test_labels[keep]
    with pytest.raises(FastddError, match="fewer than the 10 clusters"):
        check_evaluation_options(synset, small, evaluation_settings(models=["convnet"], robustness="cluster_min"))
    checked = check_evaluation_options(
        synset, small, evaluation_settings(models=["convnet"], robustness="noise", ood="gaussian")
    )
    assert checked.robustness == ("noise",) and [s.name for s in checked.ood] == ["gaussian"]


def test_report_checks_every_set_before_building_any(digits, tmp_path, monkeypatch):
    _nothing_expensive(monkeypatch)
    upper = _synset(digits, seed=3)
    keep = upper.labels >= 3
    upper.images, upper.labels = upper.images[keep], upper.labels[keep]
    with pytest.raises(FastddError, match="no images of the classes below 3"):
        prepare_report({"fine": _synset(digits), "upper": upper}, out=tmp_path / "r", ood="gaussian,holdout:3")
    assert not (tmp_path / "r").exists()
