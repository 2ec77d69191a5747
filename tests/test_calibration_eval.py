"""Calibration and training losses inside the evaluation protocol and `fastdd evaluate`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate import EvalConfig, evaluate_synthetic_set
from fastdd.evaluate.calibration_runs import CALIBRATIONS, MTS_MASKS_PER_IMAGE, parse_calibrations
from real_synsets import real_image_synset

FAST = EvalConfig(runs=2, epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_parse_calibrations():
    assert parse_calibrations("mts, none") == ("none", "mts")
    assert parse_calibrations(["ts", "TS,mts"]) == ("ts", "mts")
    with pytest.raises(FastddError, match="unknown calibration method 'platt'"):
        parse_calibrations("ts,platt")
    with pytest.raises(FastddError, match="at least one"):
        parse_calibrations(" , ")


def test_evaluate_with_calibration(digits):
    synset = real_image_synset(digits, ipc=3)
    result = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, calibration=list(CALIBRATIONS))
    json.dumps(result)
    assert result["calibration"] == ["none", "ts", "mts"] and result["mask_ratio"] == 0.3
    assert result["train_loss"] == "ce" and result["train_plugin"] is None
    model = result["models"]["convnet"]
    calib = model["calibration"]
    assert list(calib) == ["none", "ts", "mts"]
    for method, metrics in calib.items():
        assert {"acc", "ece", "nll", "temperature"} <= set(metrics), method
        for summary in metrics.values():
            assert len(summary["runs"]) == 2
            assert all(torch.isfinite(torch.tensor(v)) for v in summary["runs"])
    # raw and MTS measure the evaluation's own networks; temperature scaling never changes the argmax
    for method in ("none", "mts"):  # the protocol's accuracy is a float32 mean, the calibration one float64
        assert calib[method]["acc"]["runs"] == pytest.approx(model["acc"]["runs"], abs=1e-4)
    assert calib["none"]["temperature"]["runs"] == [1.0, 1.0]
    assert set(calib["ts"]) == {"acc", "ece", "nll", "temperature", "ece_before", "nll_before"}
    assert all(0 < t for t in calib["mts"]["temperature"]["runs"] + calib["ts"]["temperature"]["runs"])

    # Calibration does not change the evaluation networks, and one method's numbers do not depend on the others.
    plain = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST)
    assert plain["models"]["convnet"]["acc"] == model["acc"]
    assert "calibration" not in plain and "calibration" not in plain["models"]["convnet"]
    alone = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, calibration="mts")
    assert alone["models"]["convnet"]["calibration"] == {"mts": calib["mts"]}


def test_mts_ratio_zero_fits_the_temperature_of_the_unmasked_synthetic_set(digits):
    from fastdd.trust import temperature as temperature_module

    synset = real_image_synset(digits, ipc=2)
    config = EvalConfig(runs=1, epochs=3, batch_size=64)
    seen = []
    real_fit = temperature_module.fit_temperature

    def spy(logits, labels):
        seen.append((logits.clone(), labels.clone()))
        return real_fit(logits, labels)

    import fastdd.trust.temperature

    original = fastdd.trust.temperature.fit_temperature
    fastdd.trust.temperature.fit_temperature = spy
    try:
        evaluate_synthetic_set(synset, digits, models=["convnet"], config=config, calibration="mts", mask_ratio=0.0)
        masked = evaluate_synthetic_set(
            synset, digits, models=["convnet"], config=config, calibration="mts", mask_ratio=0.5
        )
    finally:
        fastdd.trust.temperature.fit_temperature = original
    (zero_logits, zero_labels), (half_logits, half_labels) = seen
    # r = 0 fits on every synthetic image once; r > 0 on every image under MTS_MASKS_PER_IMAGE masks
    assert torch.equal(zero_labels, synset.labels)
    assert torch.equal(half_labels, synset.labels.repeat(MTS_MASKS_PER_IMAGE))
    assert not torch.equal(zero_logits.repeat(MTS_MASKS_PER_IMAGE, 1), half_logits)  # the masks reached the networks
    assert masked["mask_ratio"] == 0.5


def test_ts_is_refused_before_training_when_a_class_has_one_image(digits, monkeypatch):
    import fastdd.evaluate.plan as plan

    monkeypatch.setattr(plan, "train_on_synthetic", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(FastddError, match="single synthetic image"):
        evaluate_synthetic_set(real_image_synset(digits, ipc=1), digits, models=["convnet"], config=FAST,
                               calibration="none,ts")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(calibration="mts", mask_ratio=1.0), "--mask-ratio must be less than 1"),
        (dict(train_loss="hinge"), "hinge"),
        (dict(plots="somewhere"), "needs --ood or --calibration"),
        (dict(train_plugin="vos"), "--train-plugin must be one of oal, got 'vos'"),
        (dict(train_plugin="oal"), "needs a teacher"),
        (dict(teacher="expert"), "only used by --train-plugin oal"),
        (dict(train_plugin="oal", teacher="expert", train_loss="focal"), "cannot be combined"),
    ],
)
def test_evaluate_option_errors_before_training(digits, monkeypatch, options, fragment):
    import fastdd.evaluate.plan as plan

    monkeypatch.setattr(plan, "train_on_synthetic", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(FastddError, match=fragment):
        evaluate_synthetic_set(real_image_synset(digits, ipc=2), digits, models=["convnet"], config=FAST, **options)


def test_train_losses_change_the_networks_and_are_reported(digits):
    synset = real_image_synset(digits, ipc=2)
    config = EvalConfig(runs=1, epochs=3, batch_size=64)
    ce = evaluate_synthetic_set(synset, digits, models=["convnet"], config=config, calibration="none")
    ce_again = evaluate_synthetic_set(synset, digits, models=["convnet"], config=config, calibration="none")
    assert ce["models"] == ce_again["models"]
    for loss in ("ls", "mixup", "focal"):
        other = evaluate_synthetic_set(
            synset, digits, models=["convnet"], config=config, calibration="none", train_loss=loss
        )
        assert other["train_loss"] == loss
        assert other["models"]["convnet"]["calibration"]["none"]["nll"] != ce["models"]["convnet"]["calibration"][
            "none"]["nll"], loss


def test_train_loss_is_refused_with_outlier_images(digits):
    outliers = torch.zeros(4, *digits.train_images.shape[1:])
    synset = real_image_synset(digits, ipc=2, outliers=outliers)
    with pytest.raises(FastddError, match="--ignore-outliers"):
        evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, train_loss="ls")
    result = evaluate_synthetic_set(
        synset, digits, models=["convnet"], config=EvalConfig(runs=1, epochs=1), train_loss="ls", use_outliers=False
    )
    assert result["outliers"] == 0


# --------------------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_evaluate_calibration_table_json_and_plots(digits, tmp_path):
    folder = tmp_path / "synset"
    real_image_synset(digits, ipc=2).save(folder)
    report, plots = tmp_path / "eval.json", tmp_path / "plots"
    args = ["evaluate", str(folder), "--runs", "1", "--epochs", "1", "--quiet", "--json", str(report)]
    result = runner.invoke(app, [*args, "--calibration", "none,ts,mts", "--mask-ratio", "0.2", "--plots", str(plots),
                                 "--train-loss", "focal"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("  calibration on the test set"))
    assert "mask ratio 0.2" in lines[title] and "focal loss" in result.output
    assert lines[title + 1].split()[:1] == ["method"]
    assert [line.split()[0] for line in lines[title + 2: title + 5]] == ["none", "ts", "mts"]
    assert "before scaling" in lines[title + 3]
    data = json.loads(report.read_text())
    assert data["calibration"] == ["none", "ts", "mts"] and data["train_loss"] == "focal"
    written = sorted(p.name for p in plots.iterdir())
    assert written == ["calibration_convnet_mts.png", "calibration_convnet_none.png", "calibration_convnet_ts.png",
                       "max_logits_convnet.png"]
    assert all((plots / name).stat().st_size > 1000 for name in written)


def test_cli_evaluate_bad_calibration_is_one_sentence(digits, tmp_path):
    folder = tmp_path / "synset"
    real_image_synset(digits, ipc=1).save(folder)
    result = runner.invoke(app, ["evaluate", str(folder), "--epochs", "1", "--quiet", "--calibration", "ts"])
    assert result.exit_code != 0
    assert "single synthetic image" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(folder), "--epochs", "1", "--quiet", "--calibration", "platt"])
    assert result.exit_code != 0 and "--calibration must be one of none, ts, mts, got 'platt'" in result.output


def test_evaluate_with_oal_scores_energy_and_is_reproducible(digits, tmp_path):
    from safetensors.torch import save_file

    from fastdd.models import build_model_for

    teacher = build_model_for(digits, "convnet", generator=torch.Generator().manual_seed(3))
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    synset = real_image_synset(digits, ipc=2)
    synset.meta.update(model="convnet", num_classes=digits.num_classes)
    config = EvalConfig(runs=1, epochs=2, batch_size=64)
    options = dict(models=["convnet"], config=config, ood="gaussian", train_plugin="oal", teacher=str(path))
    first = evaluate_synthetic_set(synset, digits, **options)
    assert first["train_plugin"] == "oal" and first["teacher"] == str(path) and first["scores"] == ["energy"]
    assert first == evaluate_synthetic_set(synset, digits, **options)
    plain = evaluate_synthetic_set(synset, digits, models=["convnet"], config=config, ood="gaussian")
    assert plain["models"]["convnet"]["acc"] != first["models"]["convnet"]["acc"]
