"""OOD detection: scores and metrics against hand-computed values, the OOD sets, and the evaluation end to end."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate import SCORES, EvalConfig, evaluate_synthetic_set, ood_metrics, ood_score
from fastdd.evaluate.ood_sets import GAUSSIAN_STD, OodSetSpec, build_ood_images, parse_ood_sets
from real_synsets import real_image_synset

METRIC_KEYS = {"auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"}


# ----------------------------------------------------------------------------------------------------- metrics


def test_metrics_with_an_id_ood_tie_and_both_fpr_conventions():
    # ID [3, 2, 1], OOD [2, 0]; the ID 2 and the OOD 2 tie.
    # AUROC: of the 6 (ID, OOD) pairs, 4 are ordered right and the tie counts 1/2 -> 4.5 / 6.
    # AUPR-IN (thresholds 3, 2, 1): recall steps 1/3 each at precisions 1, 2/3, 3/4 -> 29/36.
    # AUPR-OUT (OOD positive, score negated; thresholds 0, -2): recall 1/2 at precision 1, then 1/2 at 2/4 -> 3/4.
    # fpr95: all ID accepted needs threshold 1, which accepts the OOD 2 -> 1/2.
    # fpr95_openood: catching both OOD needs flagging scores <= 2, which flags the ID 2 and 1 -> 2/3.
    m = ood_metrics(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 0.0]))
    assert set(m) == METRIC_KEYS
    assert m["auroc"] == pytest.approx(75.0)
    assert m["aupr_in"] == pytest.approx(100 * 29 / 36)
    assert m["aupr_out"] == pytest.approx(75.0)
    assert m["fpr95"] == pytest.approx(50.0)
    assert m["fpr95_openood"] == pytest.approx(100 * 2 / 3)


def test_fpr95_takes_exactly_95_percent_recall():
    # 20 ID scores 1..20: accepting scores >= 2 keeps 19/20 = 95 % of ID and no OOD.
    ids = [float(v) for v in range(1, 21)]
    m = ood_metrics(ids, [1.5, 0.5])
    assert m["fpr95"] == 0.0
    # Catching both OOD samples means flagging the ID 1 too: 1 of 20.
    assert m["fpr95_openood"] == pytest.approx(5.0)
    assert m["auroc"] == pytest.approx(100 * 39 / 40)  # only the pair (ID 1, OOD 1.5) is misordered


def test_fpr95_never_splits_tied_scores():
    # Accepting 19 ID samples needs threshold 2, and the OOD sample tied at 2 is accepted with them.
    ids = [float(v) for v in range(1, 21)]
    m = ood_metrics(ids, [2.0, -5.0])
    assert m["fpr95"] == pytest.approx(50.0)
    # Catching the OOD 2 flags every score <= 2, so the ID 2 (tied) and the ID 1: 2 of 20.
    assert m["fpr95_openood"] == pytest.approx(10.0)


def test_metrics_of_perfect_and_indistinguishable_detectors():
    perfect = ood_metrics([1.0, 1.0], [0.0])
    assert perfect == {"auroc": 100.0, "aupr_in": 100.0, "aupr_out": 100.0, "fpr95": 0.0, "fpr95_openood": 0.0}
    same = ood_metrics([1.0, 1.0], [1.0, 1.0])
    assert same == pytest.approx({"auroc": 50.0, "aupr_in": 50.0, "aupr_out": 50.0, "fpr95": 100.0, "fpr95_openood": 100.0})
    reversed_ = ood_metrics([0.0], [1.0, 2.0])
    assert reversed_["auroc"] == 0.0 and reversed_["fpr95"] == 100.0 and reversed_["fpr95_openood"] == 100.0


@pytest.mark.parametrize(
    "scores_in, scores_out",
    [([], [1.0]), ([1.0], []), ([[1.0, 2.0]], [1.0]), ([1.0, float("nan")], [0.0]), ([1.0], [float("inf")])],
)
def test_metrics_reject_bad_scores(scores_in, scores_out):
    with pytest.raises(ValueError):
        ood_metrics(scores_in, scores_out)


# ------------------------------------------------------------------------------------------------------ scores


def test_scores_on_hand_logits():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    assert ood_score(logits, "msp").item() == pytest.approx(0.75)
    assert ood_score(logits, "mls").item() == pytest.approx(math.log(3.0))
    assert ood_score(logits, "energy").item() == pytest.approx(math.log(4.0))
    assert ood_score(logits, "energy", temperature=2.0).item() == pytest.approx(2 * math.log(1 + math.sqrt(3)))
    # GEN, gamma 1/2: each class contributes sqrt(p (1 - p)) = sqrt(3/16)
    assert ood_score(logits, "gen", gamma=0.5).item() == pytest.approx(-math.sqrt(3) / 2)
    assert ood_score(logits, "gen", gamma=0.5, top_m=1).item() == pytest.approx(-math.sqrt(3) / 4)
    assert ood_score(logits, "gen").item() == pytest.approx(-2 * (3 / 16) ** 0.1)


def test_every_score_ranks_a_confident_prediction_above_a_flat_one():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    for name in SCORES:
        confident, flat = ood_score(logits, name).tolist()
        assert confident > flat, name


def test_score_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(FastddError, match="odin"):
        ood_score(logits, "odin")
    with pytest.raises(ValueError):
        ood_score(torch.zeros(3), "msp")
    with pytest.raises(ValueError):
        ood_score(logits, "gen", top_m=4)
    with pytest.raises(ValueError):
        ood_score(logits, "energy", temperature=0.0)


# ---------------------------------------------------------------------------------------------------- OOD sets


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_parse_ood_sets(tmp_path):
    specs = parse_ood_sets(["gaussian, Uniform", f"digits,{tmp_path},holdout:3"], num_classes=10)
    assert [(s.name, s.kind) for s in specs] == [
        ("gaussian", "gaussian"), ("uniform", "uniform"), ("digits", "dataset"), (str(tmp_path), "folder"),
        ("holdout:3", "holdout"),
    ]
    assert specs[-1].holdout_classes == 3 and specs[2].source == "digits"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("imagenet-21k", "unknown OOD set"),
        ("holdout:0", "out of range"),
        ("holdout:10", "out of range"),
        ("holdout:two", "holdout:K"),
        ("holdout:2,holdout:3", "only one holdout"),
        ("gaussian,gaussian", "twice"),
        ("/no/such/folder", "does not exist"),
    ],
)
def test_parse_ood_set_errors(text, fragment):
    with pytest.raises(FastddError, match=fragment):
        parse_ood_sets(text, num_classes=10)


def test_noise_sets_in_model_space(digits, generator):
    gaussian = build_ood_images(OodSetSpec("gaussian", "gaussian"), digits, count=1000, generator=generator)
    uniform = build_ood_images(OodSetSpec("uniform", "uniform"), digits, count=1000, generator=generator)
    mean, std = digits.mean[0], digits.std[0]
    for images in (gaussian, uniform):
        assert images.shape == (1000, 1, 8, 8) and images.dtype == torch.float32
        unit = images * std + mean  # back to [0, 1] pixels with the ID statistics
        assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
        assert unit.mean().item() == pytest.approx(0.5, abs=0.01)
    gaussian_unit = gaussian * std + mean
    # clamp(N(0.5, 0.25^2)): 2.28 % of the pixels below 0 are clamped to 0 (and as many to 1)
    assert (gaussian_unit < 1e-6).float().mean().item() == pytest.approx(0.0228, abs=0.005)
    # and 68.27 % lie within one sigma of 0.5
    within_sigma = ((gaussian_unit - 0.5).abs() < GAUSSIAN_STD).float().mean().item()
    assert within_sigma == pytest.approx(0.6827, abs=0.01)
    assert (uniform * std + mean).var().item() == pytest.approx(1 / 12, abs=0.005)
    again = build_ood_images(
        OodSetSpec("gaussian", "gaussian"), digits, count=1000, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(again, gaussian)


def test_holdout_set_is_the_test_images_of_the_held_out_classes(digits, generator):
    spec = parse_ood_sets("holdout:4", num_classes=digits.num_classes)[0]
    held_out = digits.test_images[digits.test_labels >= 4]
    everything = build_ood_images(spec, digits, count=10_000, generator=generator)
    assert torch.equal(everything, held_out)
    some = build_ood_images(spec, digits, count=7, generator=generator)
    assert some.shape == (7, 1, 8, 8)
    assert all(any(torch.equal(row, h) for h in held_out) for row in some)


def test_folder_set_is_conformed_and_normalised(digits, generator, tmp_path):
    from PIL import Image

    for i in range(3):  # 16x16 RGB files of constant value i/2 -> 8x8 grey in [0, 1]
        Image.new("RGB", (16, 16), color=(int(127.5 * i),) * 3).save(tmp_path / f"{i}.png")
    spec = parse_ood_sets(str(tmp_path))[0]
    images = build_ood_images(spec, digits, count=100, generator=generator)
    assert images.shape == (3, 1, 8, 8)
    unit = sorted((images * digits.std[0] + digits.mean[0]).mean(dim=(1, 2, 3)).tolist())
    assert unit == pytest.approx([0.0, 0.5, 1.0], abs=0.01)
    assert build_ood_images(spec, digits, count=2, generator=generator).shape == (2, 1, 8, 8)


def test_dataset_set_is_its_test_split_conformed(digits, generator):
    from fastdd.data import ImageDataset

    g = torch.Generator().manual_seed(3)
    like = ImageDataset(  # a made-up RGB 16x16 ID dataset, so digits can be its OOD set
        name="rgb16", train_images=torch.rand(4, 3, 16, 16, generator=g), train_labels=torch.tensor([0, 1, 0, 1]),
        test_images=torch.rand(2, 3, 16, 16, generator=g), test_labels=torch.tensor([0, 1]), num_classes=2,
        class_names=["a", "b"], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), zca=None, dsa_strategy="color",
    )
    spec = parse_ood_sets("digits", num_classes=2)[0]
    images = build_ood_images(spec, like, count=50, generator=generator)
    assert images.shape == (50, 3, 16, 16)
    unit = like.to_unit_range(images)
    assert torch.allclose(like.to_model_space(unit), images, atol=1e-5)  # inside [0, 1] before normalisation
    assert torch.allclose(unit[:, 0], unit[:, 2], atol=1e-6)  # grey digits replicated over the channels
    everything = build_ood_images(spec, like, count=100_000, generator=generator)
    assert everything.shape[0] == digits.test_images.shape[0]


# ------------------------------------------------------------------------------------------ evaluation protocol


_synset = real_image_synset


FAST = EvalConfig(runs=2, epochs=2, batch_size=64)


def test_evaluate_with_noise_sets_and_plots(digits, tmp_path):
    synset = _synset(digits)
    result = evaluate_synthetic_set(
        synset, digits, models=["convnet"], config=FAST, ood=["gaussian", "uniform"], scores=["msp", "energy"],
        plots=tmp_path / "plots",
    )
    n_test = digits.test_images.shape[0]
    assert result["ood_sets"] == {"gaussian": n_test, "uniform": n_test}  # 1:1 with the whole ID test split
    assert result["scores"] == ["msp", "energy"] and result["outliers"] == 0 and result["holdout"] is None
    ood = result["models"]["convnet"]["ood"]
    for score in ("msp", "energy"):
        assert set(ood[score]) == {"gaussian", "uniform", "mean"}
        for metric in METRIC_KEYS:
            runs = {name: ood[score][name][metric]["runs"] for name in ("gaussian", "uniform", "mean")}
            assert all(len(v) == 2 and all(0 <= x <= 100 for x in v) for v in runs.values())
            expected_mean = [(a + b) / 2 for a, b in zip(runs["gaussian"], runs["uniform"])]
            assert runs["mean"] == pytest.approx(expected_mean)
            summary = ood[score]["gaussian"][metric]
            assert summary["mean"] == pytest.approx(sum(summary["runs"]) / 2)
            assert summary["std"] == pytest.approx(abs(summary["runs"][0] - summary["runs"][1]) / 2)
        png = tmp_path / "plots" / f"ood_convnet_{score}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["plots"]) == 2
    json.dumps(result)  # JSON-serialisable as is

    # The networks do not depend on the OOD options, and a set's numbers do not depend on the other sets.
    plain = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST)
    assert plain["models"]["convnet"]["acc"] == result["models"]["convnet"]["acc"]
    swapped = evaluate_synthetic_set(
        synset, digits, models=["convnet"], config=FAST, ood="uniform,gaussian", scores=["energy"]
    )
    assert swapped["models"]["convnet"]["ood"]["energy"]["gaussian"] == ood["energy"]["gaussian"]


def test_evaluate_trains_with_the_synthetic_outliers(digits, monkeypatch):
    import fastdd.evaluate.protocol as protocol

    g = torch.Generator().manual_seed(2)
    outliers = digits.to_model_space(torch.rand(20, 1, 8, 8, generator=g))
    synset = _synset(digits, outliers=outliers)
    synset.meta["hyperparameters"] = {"outlier_weight": 0.25}
    seen = []

    def recording_train_epoch(*args, **kwargs):
        batches = kwargs.get("outliers")
        seen.append((None, None) if batches is None else (batches.images, batches.weight))
        return train_epoch(*args, **kwargs)

    train_epoch = protocol.train_epoch
    monkeypatch.setattr(protocol, "train_epoch", recording_train_epoch)
    used = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, ood=["gaussian"], ood_size=60)
    ignored = evaluate_synthetic_set(
        synset, digits, models=["convnet"], config=FAST, ood=["gaussian"], ood_size=60, use_outliers=False
    )
    assert used["outliers"] == 20 and ignored["outliers"] == 0
    assert used["ood_sets"] == {"gaussian": 60}
    epochs = FAST.runs * FAST.epochs
    assert len(seen) == 2 * epochs
    assert all(torch.equal(out, outliers) and weight == 0.25 for out, weight in seen[:epochs])
    assert all(out is None for out, _ in seen[epochs:])
    a, b = used["models"]["convnet"], ignored["models"]["convnet"]
    assert a["ood"]["msp"]["gaussian"]["auroc"]["runs"] != b["ood"]["msp"]["gaussian"]["auroc"]["runs"]
    without = evaluate_synthetic_set(_synset(digits), digits, models=["convnet"], config=FAST)
    assert without["models"]["convnet"]["acc"] == b["acc"]  # ignoring outliers = a set without them


def test_evaluate_holdout(digits):
    synset = _synset(digits)
    result = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, ood=["holdout:5", "uniform"])
    assert result["holdout"] == 5
    n_in = int((digits.test_labels < 5).sum())
    n_out = int((digits.test_labels >= 5).sum())
    assert result["ood_sets"] == {"holdout:5": min(n_in, n_out), "uniform": n_in}
    assert set(result["models"]["convnet"]["ood"]["msp"]) == {"holdout:5", "uniform", "mean"}


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(ood=["gaussian"], scores=["odin"]), "--score must be one of msp, mls, energy, gen, got 'odin'"),
        (dict(scores=["msp"]), "needs at least one --ood"),
        (dict(ood=["digits"]), "in-distribution dataset"),
        (dict(ood=["holdout:10"]), "out of range"),
        (dict(ood=["gaussian"], ood_size=0), "--ood-size"),
    ],
)
def test_evaluate_rejects_bad_options_before_training(digits, kwargs, fragment):
    with pytest.raises(FastddError, match=fragment):
        evaluate_synthetic_set(_synset(digits), digits, models=["convnet"], config=FAST, **kwargs)


# --------------------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_evaluate_ood(digits, tmp_path):
    folder = tmp_path / "synset"
    _synset(digits).save(folder)
    report, plots = tmp_path / "eval.json", tmp_path / "plots"
    args = ["evaluate", str(folder), "--runs", "2", "--epochs", "2", "--quiet", "--json", str(report)]
    result = runner.invoke(
        app, [*args, "--ood", "gaussian", "--ood", "uniform", "--score", "msp,gen", "--ood-size", "40",
              "--plots", str(plots)],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("convnet: acc")
    assert sum(line.startswith("  OOD score ") for line in lines) == 2
    header = next(line for line in lines if "fpr95_openood" in line)
    assert header.split() == ["set", "auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood"]
    data = json.loads(report.read_text())
    for score in ("msp", "gen"):
        for name in ("gaussian", "uniform", "mean"):
            row = next(line for line in lines[lines.index(next(l for l in lines if f"score {score}" in l)):]
                       if line.split()[:1] == [name])
            auroc = data["models"]["convnet"]["ood"][score][name]["auroc"]
            assert row.split()[1:4] == [f"{auroc['mean']:.2f}", "±", f"{auroc['std']:.2f}"]
        assert (plots / f"ood_convnet_{score}.png").stat().st_size > 0
    assert data["ood_sets"] == {"gaussian": 40, "uniform": 40}


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--ood", "imagenet-21k"], "imagenet-21k"), (["--ood", "holdout:12"], "holdout:12"),
     (["--ood", "gaussian", "--score", "odin"], "odin")],
)
def test_cli_evaluate_bad_ood_options(digits, tmp_path, extra, fragment):
    folder = tmp_path / "synset"
    _synset(digits).save(folder)
    result = runner.invoke(app, ["evaluate", str(folder), "--runs", "1", "--epochs", "1", "--quiet", *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
