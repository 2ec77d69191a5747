"""``--mask-ratio auto``: MTS's ratio chosen per network on held-out real training images, never on the test set."""

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config import ConfigError
from fastdd.config.evaluate import CalibrationEvalConfig, EvaluationSettings
from fastdd.data import load_dataset
from fastdd.evaluate.calibration import calibration_metrics
from fastdd.evaluate.calibration_runs import (
    AUTO_MASK_RATIOS,
    MTS_MASKS_PER_IMAGE,
    CalibrationTask,
    calibration_validation_split,
)
from fastdd.evaluate.plan import plan_evaluation
from fastdd.models import build_model
from fastdd.training import predict_logits, train_epoch
from fastdd.trust.temperature import masked_temperature
from real_synsets import real_image_synset


class Untouchable:
    """Stands in for the test images: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was read ({name})")

    def __getitem__(self, key):
        raise AssertionError("the test set was read")

    def __len__(self):
        raise AssertionError("the test set was read")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    """A small ConvNet trained for a few epochs on 5 real images per class: over-confident, so MTS matters."""
    synset = real_image_synset(digits, ipc=5)
    g = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=1, num_classes=10, image_size=(8, 8), width=16, depth=2, generator=g)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        train_epoch(net, optimizer, synset.images, synset.labels, batch_size=50, generator=g)
    return net, synset


def auto_task(digits, synset, count=200, seed=0):
    task = SimpleNamespace(images=synset.images, targets=synset.labels, test_images=digits.test_images,
                           test_labels=digits.test_labels, shape=SimpleNamespace(num_classes=10))
    settings = CalibrationEvalConfig(calibration="mts", mask_ratio="auto", calibration_val=count)
    return CalibrationTask.create(task, ("mts",), seed=seed, settings=settings, train_images=digits.train_images,
                                  train_labels=digits.train_labels)


def test_the_validation_split_is_real_training_images(digits):
    g = torch.Generator().manual_seed(0)
    images, labels = calibration_validation_split(digits.train_images, digits.train_labels, 300, classes=10,
                                                  generator=g)
    assert images.shape[0] == 300 == labels.shape[0]
    train = digits.train_images.flatten(1)
    index = torch.cdist(images.flatten(1), train).argmin(dim=1)
    assert torch.equal(train[index], images.flatten(1)) and torch.equal(digits.train_labels[index], labels)
    assert len(set(index.tolist())) == 300  # without replacement
    few, few_labels = calibration_validation_split(digits.train_images, digits.train_labels, 10**6, classes=3,
                                                   generator=g)
    assert few_labels.max() < 3 and len(few) == int((digits.train_labels < 3).sum())


def test_auto_never_reads_the_test_images(digits, trained):
    net, synset = trained
    task = auto_task(digits, synset)
    task.test_images, task.test_labels = Untouchable(), Untouchable()
    ratio, temperature, by_ratio = task.choose_mask_ratio(net)
    assert ratio in AUTO_MASK_RATIOS and temperature > 0 and list(by_ratio) == list(AUTO_MASK_RATIOS)


def test_auto_choice_does_not_depend_on_the_test_set(digits, trained):
    """Two evaluations whose test sets differ (shuffled labels, other images) choose the same ratio and temperature."""
    net, synset = trained
    one, other = auto_task(digits, synset), auto_task(digits, synset)
    other.test_images = torch.randn_like(digits.test_images)
    other.test_labels = digits.test_labels.flip(0)
    rows_one, _ = one.run(net, predict_logits(net, one.test_images), train_subset=None)
    rows_other, _ = other.run(net, predict_logits(net, other.test_images), train_subset=None)
    for key in ("mask_ratio", "temperature"):
        assert rows_one["mts"][key] == rows_other["mts"][key]
    assert rows_one["mts"]["ece"] != rows_other["mts"]["ece"]  # the test metrics do use the test sets


def test_auto_keeps_the_ratio_with_the_lowest_validation_ece(digits, trained):
    """The choice replayed by hand: the same masks (one generator, ratios in order), ECE on the held-out images."""
    net, synset = trained
    task = auto_task(digits, synset)
    ratio, temperature, by_ratio = task.choose_mask_ratio(net)
    generator = auto_task(digits, synset).mts_generator
    val_logits = predict_logits(net, task.val_images)
    expected = {}
    for r in AUTO_MASK_RATIOS:
        t = masked_temperature(net, synset.images, synset.labels, ratio=r, generator=generator,
                               repeats=MTS_MASKS_PER_IMAGE)
        expected[r] = (calibration_metrics(val_logits, task.val_labels, t, n_bins=15)["ece"], t)
    assert by_ratio == pytest.approx({r: e for r, (e, _) in expected.items()}, abs=1e-12)
    best = min(AUTO_MASK_RATIOS, key=lambda r: expected[r][0])
    assert ratio == best and temperature == pytest.approx(expected[best][1], rel=1e-12)
    assert len(set(round(e, 6) for e in by_ratio.values())) > 1  # the ratios do differ on this net


def test_auto_from_the_library(digits):
    synset = real_image_synset(digits, ipc=2)
    settings = EvaluationSettings(runs=2, epochs=3, calibration="none,mts", mask_ratio="auto", calibration_val=100)
    result = plan_evaluation(synset, digits, settings).run()
    mts = result["models"]["convnet"]["calibration"]["mts"]
    assert len(mts["mask_ratio"]["runs"]) == 2 and all(r in AUTO_MASK_RATIOS for r in mts["mask_ratio"]["runs"])
    assert result["mask_ratio"] == "auto"


@pytest.mark.parametrize("options, message", [
    (dict(mask_ratio="autoo"), "--mask-ratio must be a number or auto"),
    (dict(mask_ratio=0.3, calibration_val=50), "--calibration-val only applies with --mask-ratio auto"),
    (dict(mask_ratio="auto", calibration_val=0), "--calibration-val must be at least 1"),
    (dict(mask_ratio=1.0), "--mask-ratio must be less than 1"),
])
def test_bad_auto_options(options, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationEvalConfig(**options)


def test_auto_from_the_command_line(tmp_path, digits):
    synset = real_image_synset(digits, ipc=2)
    synset.meta.update(format="fastdd-synset/1", num_classes=10, class_names=list(digits.class_names),
                       image_shape=[1, 8, 8])
    synset.save(tmp_path / "set")
    report = tmp_path / "eval.json"
    runner = CliRunner()
    result = runner.invoke(app, [
        "evaluate", str(tmp_path / "set"), "--runs", "1", "--epochs", "2", "--calibration", "mts",
        "--mask-ratio", "AUTO", "--calibration-val", "50", "--json", str(report), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert "ratio chosen on held-out real images" in result.output
    data = json.loads(report.read_text())
    assert data["mask_ratio"] == "auto"
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "set"), "--mask-ratio", "half"])
    assert bad.exit_code != 0 and "must be a number or auto" in bad.output and "Traceback" not in bad.output


def test_auto_skips_ratios_whose_fit_overshoots_and_a_fixed_ratio_says_so(digits, trained, monkeypatch):
    """The authors' fit can end below 0 (no line search): auto skips that ratio, a fixed ratio stops with a sentence."""
    from fastdd.errors import FastddError

    net, synset = trained
    task = auto_task(digits, synset)
    monkeypatch.setattr(task, "_mts_temperature", lambda net, ratio: -50.5 if ratio < 0.5 else 1.0 + ratio)
    ratio, temperature, by_ratio = task.choose_mask_ratio(net)
    assert ratio >= 0.5 and temperature == 1.0 + ratio
    assert all(by_ratio[r] != by_ratio[r] for r in AUTO_MASK_RATIOS if r < 0.5)  # NaN
    monkeypatch.setattr(task, "_mts_temperature", lambda net, ratio: float("nan"))
    with pytest.raises(FastddError, match="failed at every ratio"):
        task.choose_mask_ratio(net)
    task.settings = CalibrationEvalConfig(calibration="mts", mask_ratio=0.3, mts_fit="authors")
    monkeypatch.setattr(task, "_mts_temperature", lambda net, ratio: -50.5)
    with pytest.raises(FastddError, match="ended at T = -50.5 at --mask-ratio 0.3"):
        task.run(net, predict_logits(net, digits.test_images), train_subset=None)
