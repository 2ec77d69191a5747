"""MTS as its authors ran it: their temperature fit, element-wise masks, ECE bins; from the library and the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.evaluate.calibration import calibration_metrics, ece
from fastdd.trust.masking import element_mask, mask_images, random_mask
from fastdd.trust.temperature import fit_temperature, fit_temperature_authors, masked_temperature


def _logits(seed=0, n=200, k=5, scale=8.0):
    """Over-confident logits: a margin of ``scale`` on a prediction that is right 70 % of the time (so T > 1)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (n,), generator=g)
    wrong = torch.rand(n, generator=g) > 0.7
    predicted = torch.where(wrong, (labels + 1) % k, labels)
    return torch.randn(n, k, generator=g, dtype=torch.float64) + scale * F.one_hot(predicted, k), labels


def test_the_authors_fit_equals_their_loop():
    """Their ModelWithTemperature.set_temperature, replayed by hand in float64: T = 1.5, LBFGS(lr=0.01,
    max_iter=50) without a line search, one step on the NLL of logits / T."""
    logits, labels = _logits()
    t = torch.nn.Parameter(torch.ones(1, dtype=torch.float64) * 1.5)
    optimizer = torch.optim.LBFGS([t], lr=1e-2, max_iter=50)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.CrossEntropyLoss()(logits / t.unsqueeze(1).expand(logits.shape), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert fit_temperature_authors(logits, labels) == pytest.approx(float(t.detach()), rel=1e-12, abs=1e-12)


def test_the_authors_fit_stops_short_of_the_minimum_that_fastdd_finds():
    logits, labels = _logits()
    best, theirs = fit_temperature(logits, labels), fit_temperature_authors(logits, labels)
    nll = lambda t: float(F.cross_entropy(logits / t, labels))  # noqa: E731
    assert best > 1.5 and 1.5 < theirs < best  # pulled toward their start
    assert nll(best) < nll(theirs) < nll(1.5)


def test_element_masks_drop_each_value_independently_with_the_ratio():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(200, 3, 16, 16)
    masked = element_mask(x, 0.3, generator=g)
    dropped = masked == 0
    assert abs(float(dropped.double().mean()) - 0.3) < 0.005
    per_image = dropped.flatten(1).sum(dim=1)
    assert per_image.min() < per_image.max()  # a random count, unlike pixel masks
    assert not torch.equal(dropped[:, 0], dropped[:, 1])  # channels independent
    pixel = random_mask(x, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pixel[:, 0] == 0, pixel[:, 2] == 0)  # pixel masks are shared over channels
    assert mask_images(x, 0.0, generator=g, unit="element") is x
    with pytest.raises(ValueError, match="pixel, element"):
        mask_images(x, 0.3, generator=g, unit="patch")


def test_element_masks_are_differentiable():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: element_mask(t, 0.5, generator=torch.Generator().manual_seed(1)), (x,)
    )


def test_masked_temperature_uses_the_unit_and_the_fit():
    g = torch.Generator().manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5)).double()
    images = torch.randn(20, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(5).repeat(4)
    with torch.no_grad():  # a net that fits its images with a margin: masks then change its confidence
        net[1].weight.copy_(torch.randn(5, 48, generator=g, dtype=torch.float64))
        net[1].bias.zero_()
        for c in range(5):
            net[1].weight[c] += 2.0 * images[labels == c].flatten(1).mean(dim=0)
    kwargs = dict(ratio=0.4, repeats=2)
    pixel = masked_temperature(net, images, labels, generator=torch.Generator().manual_seed(0), **kwargs)
    element = masked_temperature(net, images, labels, generator=torch.Generator().manual_seed(0), unit="element",
                                 **kwargs)
    authors = masked_temperature(net, images, labels, generator=torch.Generator().manual_seed(0), unit="element",
                                 fit="authors", **kwargs)
    g = torch.Generator().manual_seed(0)
    masked = element_mask(images.repeat(2, 1, 1, 1), 0.4, generator=g)
    with torch.no_grad():
        by_hand = fit_temperature_authors(net(masked), labels.repeat(2))
    assert 0.01 < pixel < 100 and 0.01 < element < 100 and pixel != element
    assert authors == pytest.approx(by_hand, rel=1e-12)


def test_ece_bins():
    logits, labels = _logits(scale=2.0)
    assert calibration_metrics(logits, labels, n_bins=10)["ece"] == pytest.approx(100 * ece(logits, labels, 10))
    assert calibration_metrics(logits, labels)["ece"] != calibration_metrics(logits, labels, n_bins=10)["ece"]


def test_the_command_line_runs_mts_as_the_authors_did(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    tiny = ["--width", "8", "--batch-real", "16", "--iterations", "2", "--quiet"]
    assert runner.invoke(app, ["distill", "--method", "dm", "--ipc", "2", "--out", str(out), *tiny]).exit_code == 0
    report = tmp_path / "eval.json"
    result = runner.invoke(app, [
        "evaluate", str(out), "--runs", "1", "--epochs", "2", "--calibration", "none,mts", "--mts-fit", "authors",
        "--mask-unit", "element", "--ece-bins", "10", "--json", str(report), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["mts_fit"], data["mask_unit"], data["ece_bins"]) == ("authors", "element", 10)
    assert data["models"]["convnet"]["calibration"]["mts"]["temperature"]["mean"] > 0
