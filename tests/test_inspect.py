"""Diagnostics of synthetic sets (the SVD curve and the max-logit spread) and `fastdd inspect`."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.evaluate.diagnostics import (
    components_reaching,
    explained_variance_curve,
    max_logit_summary,
    save_explained_variance_plot,
    svd_summary,
)
from real_synsets import real_image_synset

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_rank_one_images_have_all_information_in_one_component(generator):
    direction = torch.randn(1, 2, 3, 3, generator=generator)
    images = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(4, 1, 1, 1) * direction
    curve = explained_variance_curve(images)
    assert curve.shape == (4,) and curve.dtype == torch.float64
    torch.testing.assert_close(curve, torch.ones(4, dtype=torch.float64))


def test_orthogonal_equal_norm_images_give_the_diagonal():
    images = torch.zeros(4, 1, 3, 3)
    for i, (row, col) in enumerate([(0, 0), (0, 2), (1, 1), (2, 0)]):
        images[i, 0, row, col] = 3.0
    curve = explained_variance_curve(images)
    torch.testing.assert_close(curve, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    assert [components_reaching(curve, level) for level in (0.25, 0.5, 0.6, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    summary = svd_summary(curve)
    assert summary["components"] == 4
    assert [p["k"] for p in summary["ratio_at"]] == [1, 1, 1, 1, 1, 2]
    assert summary["ratio_at"][-1] == {"fraction": 0.5, "k": 2, "ratio": 0.5}
    assert summary["components_for"] == {"50": 2, "90": 4, "99": 4}


def test_unequal_singular_values_and_the_number_of_components():
    # two orthogonal images of norms 3 and 1: singular values (3, 1) -> (3/4, 1)
    images = torch.zeros(2, 1, 2, 2)
    images[0, 0, 0, 0], images[1, 0, 1, 1] = 3.0, -1.0
    torch.testing.assert_close(explained_variance_curve(images), torch.tensor([0.75, 1.0], dtype=torch.float64))
    # more images than pixels: min(N, C*H*W) singular values
    assert explained_variance_curve(torch.randn(10, 1, 2, 2)).shape == (4,)


def test_centring_is_optional_and_off_by_default():
    common = torch.zeros(1, 1, 2, 2)
    common[0, 0, 0, 0] = 5.0
    delta = torch.zeros(1, 1, 2, 2)
    delta[0, 0, 1, 1] = 1.0
    images = torch.cat([common + delta, common - delta])  # singular values (5 sqrt 2, sqrt 2) uncentred
    torch.testing.assert_close(explained_variance_curve(images), torch.tensor([5 / 6, 1.0], dtype=torch.float64))
    torch.testing.assert_close(explained_variance_curve(images, center=True)[0], torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="all zero"):
        explained_variance_curve(common.expand(3, -1, -1, -1), center=True)


def test_max_logit_summary_hand_case():
    top = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    logits = torch.stack([top, top - 1.5], dim=1)  # the max logit is the first column
    summary = max_logit_summary(logits)
    assert summary["mean"] == pytest.approx(3.0)
    assert summary["std"] == pytest.approx(math.sqrt(2.0))  # population form
    assert summary["p5"] == pytest.approx(1.2) and summary["p50"] == pytest.approx(3.0)
    assert summary["p95"] == pytest.approx(4.8)
    with pytest.raises(ValueError):
        max_logit_summary(top)


def test_svd_plot_is_written(tmp_path):
    path = tmp_path / "plots" / "svd.png"
    save_explained_variance_plot({"a": torch.tensor([0.5, 1.0]), "b": torch.tensor([0.2, 0.6, 1.0])}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def synset_dirs(tmp_path_factory):
    digits = load_dataset("digits")
    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for seed in (1, 2):
        path = folder / f"set{seed}"
        real_image_synset(digits, ipc=2, seed=seed).save(path)
        paths.append(path)
    return paths


def test_cli_inspect_prints_plots_and_matches_evaluate(synset_dirs, tmp_path):
    plots, report = tmp_path / "plots", tmp_path / "inspect.json"
    result = invoke("inspect", *synset_dirs, "--epochs", 1, "--plots", plots, "--json", report, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.output.count("cumulative ratio") == 2
    assert result.output.count("max logit on the digits test set (convnet, 1 run(s) of 1 epochs, pooled)") == 2
    for name in ("svd.png", "max_logits.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(report.read_text())
    first = data["sets"][0]
    assert first["synset"] == str(synset_dirs[0]) and first["images"] == 20 and first["center"] is False
    assert len(first["svd"]["curve"]) == 20 and first["svd"]["curve"][-1] == pytest.approx(1.0)
    assert set(first["max_logit"]) == {"mean", "std", "p5", "p50", "p95"}
    # the networks are those of `fastdd evaluate` with the same options
    evaluation = tmp_path / "evaluate.json"
    result = invoke("evaluate", synset_dirs[0], "--runs", 1, "--epochs", 1, "--json", evaluation, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads(evaluation.read_text())["models"]["convnet"]["acc"]["mean"] == first["acc"]["mean"]


def test_cli_inspect_without_training(synset_dirs, tmp_path):
    plots = tmp_path / "plots"
    result = invoke("inspect", synset_dirs[0], "--no-train", "--plots", plots)
    assert result.exit_code == 0, result.output
    assert "components reaching 50 / 90 / 99 %" in result.output and "max logit" not in result.output
    assert (plots / "svd.png").exists() and not (plots / "max_logits.png").exists()


def test_cli_inspect_bad_input(synset_dirs, tmp_path):
    for args, fragment in (
        ((synset_dirs[0], tmp_path / "missing"), "is not a synthetic set"),
        ((synset_dirs[0], "--runs", 0), "--runs"),
        ((synset_dirs[0], "--model", "transformer"), "--model must be one of convnet"),
    ):
        result = invoke("inspect", *args, "--epochs", 1, "--quiet")
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
