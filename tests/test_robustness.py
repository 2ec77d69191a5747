"""Robustness evaluation: the three test-time corruptions, KMeans cluster accuracies, and the evaluation end to end."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import ImageDataset, load_dataset
from fastdd.data.corruptions import (
    ROBUSTNESS_NOISE_STD,
    gaussian_blur,
    gaussian_kernel1d,
    gaussian_noise,
    invert_all,
    invert_channels,
)
from fastdd.errors import FastddError
from fastdd.evaluate import EvalConfig, evaluate_synthetic_set
from fastdd.evaluate.robustness import (
    ROBUSTNESS_SETS,
    RobustnessTests,
    build_robustness_tests,
    cluster_accuracies,
    corrupt_images,
    kmeans_clusters,
    parse_robustness_sets,
    robustness_row,
)
from fastdd.evaluate.robustness import test_clusters as clusters_of_test_set
from real_synsets import real_image_synset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _blob_dataset(test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int = 2) -> ImageDataset:
    """A dataset around hand-made model-space test images, normalised with mean 0.5 and std 0.25 per channel."""
    channels = test_images.shape[1]
    return ImageDataset(
        name="blobs",
        train_images=test_images[:1].clone(),
        train_labels=test_labels[:1].clone(),
        test_images=test_images,
        test_labels=test_labels,
        num_classes=num_classes,
        class_names=[str(c) for c in range(num_classes)],
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        zca=None,
        dsa_strategy="",
    )


class BrightnessNet(torch.nn.Module):
    """Predicts class 1 when the mean model-space pixel is positive (the [0, 1] mean above 0.5 for mean 0.5)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives `predict_logits` a device to read

    def forward(self, x):
        m = x.flatten(1).mean(dim=1) + self.anchor
        return torch.stack([-m, m], dim=1)


# ------------------------------------------------------------------------------------------------- corruptions


def test_noise_std_is_the_square_root_of_0_005():
    assert ROBUSTNESS_NOISE_STD == pytest.approx(0.0707107, abs=1e-7)
    assert ROBUSTNESS_NOISE_STD**2 == pytest.approx(0.005)


def test_gaussian_noise_is_the_generators_normal_draw_added_and_clipped(generator):
    x = torch.rand(2, 3, 5, 7, generator=generator)
    replay = torch.Generator().manual_seed(11)
    expected = (x + ROBUSTNESS_NOISE_STD * torch.randn(x.shape, generator=replay)).clamp(0, 1)
    out = gaussian_noise(x, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out, expected)
    assert torch.equal(out, gaussian_noise(x, generator=torch.Generator().manual_seed(11)))  # determinism
    assert not torch.equal(out, gaussian_noise(x, generator=torch.Generator().manual_seed(12)))
    assert torch.equal(gaussian_noise(x, generator=generator, std=0.0), x)


def test_gaussian_noise_statistics_on_grey_and_clamping_at_the_ends(generator):
    grey = torch.full((1, 1, 200, 200), 0.5)  # 7 standard deviations from either end: nothing is clipped
    shift = gaussian_noise(grey, generator=generator) - 0.5
    n = shift.numel()
    assert abs(float(shift.mean())) < 4 * ROBUSTNESS_NOISE_STD / math.sqrt(n)
    assert float(shift.std()) == pytest.approx(ROBUSTNESS_NOISE_STD, rel=0.02)

    ends = torch.cat([torch.zeros(1, 1, 200, 100), torch.ones(1, 1, 200, 100)], dim=3)
    out = gaussian_noise(ends, generator=generator)
    black, white = out[..., :100], out[..., 100:]
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    # Half of the draws push out of range and are clipped onto the end itself.
    assert float((black == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert float((white == 1).float().mean()) == pytest.approx(0.5, abs=0.02)
    # E[max(n, 0)] = std / sqrt(2 pi) for n ~ N(0, std^2).
    half_normal_mean = ROBUSTNESS_NOISE_STD / math.sqrt(2 * math.pi)
    assert float(black.mean()) == pytest.approx(half_normal_mean, rel=0.03)
    assert float(1 - white.mean()) == pytest.approx(half_normal_mean, rel=0.03)


def _hand_kernel(sigma: float) -> list[float]:
    half = math.ceil(3 * sigma)
    weights = [math.exp(-(t * t) / (2 * sigma * sigma)) for t in range(-half, half + 1)]
    return [w / sum(weights) for w in weights]


def test_blur_kernel_is_the_sampled_gaussian_of_sigma_radius():
    kernel = gaussian_kernel1d(2.0, dtype=torch.float64)
    assert kernel.shape == (13,)  # taps -6..6 = ceil(3 sigma)
    assert kernel.tolist() == pytest.approx(_hand_kernel(2.0), abs=1e-15)
    assert gaussian_kernel1d(0.5).shape == (5,)


def test_blur_of_an_interior_impulse_is_the_outer_product_of_the_kernel():
    image = torch.zeros(1, 1, 31, 33, dtype=torch.float64)
    image[0, 0, 15, 16] = 1.0
    out = gaussian_blur(image)
    k = torch.tensor(_hand_kernel(2.0), dtype=torch.float64)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-12)  # mass preserved away from the edges
    assert torch.allclose(out[0, 0, 9:22, 10:23], torch.outer(k, k), atol=1e-15)
    assert float(out[0, 0].abs().sum() - out[0, 0, 9:22, 10:23].sum()) == pytest.approx(0.0, abs=1e-15)
    # The variance of the profile is sigma^2 = 4 less the tails cut beyond 3 sigma (3.95).
    offsets = torch.arange(-6, 7, dtype=torch.float64)
    assert float((out[0, 0, 15, 10:23] / k[6] * offsets**2).sum()) == pytest.approx(4.0, abs=0.06)


def test_blur_preserves_constants_and_extends_the_edges():
    constant = torch.full((2, 3, 8, 8), 0.3)  # an 8 px image is narrower than the 13-tap kernel
    assert torch.allclose(gaussian_blur(constant), constant, atol=1e-7)
    # A bright first column: at column x the output is the kernel mass over the offsets t with x + t <= 0, since the
    # pixels left of the border repeat column 0.
    step = torch.zeros(1, 1, 4, 20, dtype=torch.float64)
    step[..., 0] = 1.0
    out = gaussian_blur(step)
    k = _hand_kernel(2.0)
    for x in range(8):
        expected = sum(w for t, w in zip(range(-6, 7), k) if x + t <= 0)
        assert torch.allclose(out[0, 0, :, x], torch.full((4,), expected, dtype=torch.float64), atol=1e-14)


def test_blur_is_close_to_pil_gaussian_blur_radius_2():
    np = pytest.importorskip("numpy")
    image_module = pytest.importorskip("PIL.Image")
    image_filter = pytest.importorskip("PIL.ImageFilter")
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    smooth = torch.stack([0.5 + 0.45 * torch.sin(xx / 3) * torch.cos(yy / 5), (xx + yy) / 62, (xx - yy).abs() / 31])
    pixels = (smooth * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = image_module.fromarray(pixels).filter(image_filter.GaussianBlur(radius=2))
    pil = torch.from_numpy(np.asarray(pil).astype("float32") / 255).permute(2, 0, 1)
    ours = gaussian_blur(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255)[0]
    # PIL approximates the Gaussian with three box passes and rounds to 8 bits; measured: mean 0.0035, max 0.039.
    difference = (ours - pil).abs()
    assert float(difference.mean()) < 0.006 and float(difference.max()) < 0.06
    assert float((smooth - pil).abs().mean()) > 5 * float(difference.mean())  # the blur itself is much larger


def test_invert_all_is_one_minus_x_on_every_channel(generator):
    x = torch.rand(2, 3, 4, 5, generator=generator)
    assert torch.equal(invert_all(x), 1 - x)
    assert torch.equal(invert_all(x), invert_channels(x, channels=(0, 1, 2)))
    assert not torch.equal(invert_all(x), invert_channels(x))  # POE's default spares the red channel


def test_corruption_input_errors():
    with pytest.raises(ValueError, match="radius"):
        gaussian_blur(torch.zeros(1, 1, 4, 4), radius=0)
    with pytest.raises(ValueError, match="std"):
        gaussian_noise(torch.zeros(1, 1, 4, 4), generator=torch.Generator(), std=-1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        invert_all(torch.zeros(4, 4))


def test_corrupt_images_works_on_unit_pixels_of_the_model_space(generator):
    unit = torch.rand(3, 3, 6, 6, generator=generator)
    data = _blob_dataset((unit - 0.5) / 0.25, torch.zeros(3, dtype=torch.int64))
    inverted = corrupt_images(data, data.test_images, "invert", generator=generator)
    assert torch.allclose(inverted, ((1 - unit) - 0.5) / 0.25, atol=1e-5)  # = -x for mean 0.5
    blurred = corrupt_images(data, data.test_images, "blur", generator=generator)
    assert torch.allclose(blurred * 0.25 + 0.5, gaussian_blur(unit), atol=1e-5)


# ------------------------------------------------------------------------------------------------ set parsing


def test_parse_robustness_sets():
    assert parse_robustness_sets(None) == ROBUSTNESS_SETS == ("cluster_min", "cluster_mean", "noise", "blur", "invert")
    assert parse_robustness_sets("invert, noise") == ("noise", "invert")  # table order, not the order given
    assert parse_robustness_sets(["Cluster-Min", "blur"]) == ("cluster_min", "blur")


@pytest.mark.parametrize(
    "text, fragment",
    [("noise,fog", "unknown robustness set 'fog'"), ("blur,blur", "listed twice"), (" , ", "no robustness")],
)
def test_parse_robustness_set_errors(text, fragment):
    with pytest.raises(FastddError, match=fragment):
        parse_robustness_sets(text)


# ---------------------------------------------------------------------------------------------------- clusters


def test_cluster_accuracies_by_hand():
    predictions = torch.tensor([0, 1, 1, 0, 2, 2, 0])
    labels = torch.tensor([0, 1, 0, 0, 2, 1, 1])
    clusters = torch.tensor([0, 0, 0, 2, 2, 2, 2])  # cluster 1 is empty
    acc = cluster_accuracies(predictions, labels, clusters, 3)
    assert acc.dtype == torch.float64
    assert acc[0] == pytest.approx(2 / 3) and acc[2] == pytest.approx(2 / 4) and math.isnan(acc[1])
    with pytest.raises(ValueError, match="one shape"):
        cluster_accuracies(predictions, labels[:3], clusters, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cluster_accuracies(predictions, labels, clusters, 2)


def _three_blobs(generator):
    """60 images in 3 well-separated blobs (constant 0.15, 0.5, 0.85 plus small noise), labels alternating."""
    levels = torch.tensor([0.15, 0.5, 0.85]).repeat_interleave(20)
    unit = (levels.view(-1, 1, 1, 1) + 0.01 * torch.randn(60, 1, 4, 4, generator=generator)).clamp(0, 1)
    labels = torch.arange(60) % 2
    return _blob_dataset((unit - 0.5) / 0.25, labels), levels


def test_cluster_min_on_blobs_with_a_known_worst_blob(generator):
    data, levels = _three_blobs(generator)
    clusters = kmeans_clusters(data.test_images, num_clusters=3)
    assert clusters.dtype == torch.int64 and clusters.shape == (60,)
    # KMeans finds the blobs: one id per blob (in some order), three distinct ids.
    blob_ids = [clusters[levels == v].unique().tolist() for v in (0.15, 0.5, 0.85)]
    assert all(len(ids) == 1 for ids in blob_ids) and len({ids[0] for ids in blob_ids}) == 3

    # Right on the dark and bright blobs, right on 6 of the 20 middle images.
    predictions = data.test_labels.clone()
    middle = (levels == 0.5).nonzero().flatten()
    predictions[middle[6:]] = 1 - predictions[middle[6:]]
    logits = torch.nn.functional.one_hot(predictions, 2).float()
    tests = build_robustness_tests(data, ["cluster_min", "cluster_mean"], seed=0, num_clusters=3)
    assert torch.equal(tests.clusters, clusters) and tests.cluster_sizes() == [20, 20, 20]
    row = robustness_row(BrightnessNet(), tests, clean_logits=logits)
    assert row == pytest.approx({"cluster_min": 30.0, "cluster_mean": (100 + 100 + 30) / 3})


def test_empty_clusters_are_left_out_of_min_and_mean():
    labels = torch.tensor([0, 1, 1, 0])
    tests = RobustnessTests(
        sets=("cluster_min", "cluster_mean"),
        labels=labels,
        clusters=torch.tensor([0, 0, 3, 3]),  # clusters 1 and 2 are empty
        num_clusters=4,
        corrupted={},
    )
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 0]), 2).float()
    row = robustness_row(BrightnessNet(), tests, clean_logits=logits)
    assert row == pytest.approx({"cluster_min": 50.0, "cluster_mean": 75.0})
    assert tests.cluster_sizes() == [2, 0, 0, 2]


def test_kmeans_clusters_are_deterministic_and_cached(digits):
    clusters = clusters_of_test_set(digits)
    assert clusters.shape == (digits.test_images.shape[0],) and clusters.dtype == torch.int64
    assert set(clusters.tolist()) == set(range(10))
    assert clusters_of_test_set(digits) is clusters  # cached for this tensor
    fresh = kmeans_clusters(digits.test_images.clone())  # another tensor: computed again, the same ids
    assert fresh is not clusters and torch.equal(fresh, clusters)
    with pytest.raises(FastddError, match="fewer than the 10 clusters"):
        kmeans_clusters(digits.test_images[:9])


def test_corruption_accuracies_of_a_brightness_classifier():
    # Constant images, label = brightness above 0.5, all at least 0.2 away from 0.5: the blur keeps constants, the
    # noise moves an 8x8 image's mean by ~0.07 / 8, so both keep every prediction; the inversion flips all of them.
    levels = torch.tensor([0.1, 0.2, 0.25, 0.75, 0.8, 0.95, 0.3, 0.7])
    unit = levels.view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    data = _blob_dataset((unit - 0.5) / 0.25, (levels > 0.5).long())
    tests = build_robustness_tests(data, ["noise", "blur", "invert"], seed=0)
    assert tests.clusters is None and set(tests.corrupted) == {"noise", "blur", "invert"}
    assert robustness_row(BrightnessNet(), tests) == {"noise": 100.0, "blur": 100.0, "invert": 0.0}
    again = build_robustness_tests(data, ["invert", "noise"], seed=0)
    assert torch.equal(again.corrupted["noise"], tests.corrupted["noise"])  # a set's images ignore the other sets
    other_seed = build_robustness_tests(data, ["noise"], seed=1)
    assert not torch.equal(other_seed.corrupted["noise"], tests.corrupted["noise"])


# ------------------------------------------------------------------------------------------ evaluation protocol


_synset = real_image_synset


FAST = EvalConfig(runs=2, epochs=2, batch_size=64)


def test_evaluate_with_robustness(digits):
    synset = _synset(digits)
    result = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, robustness=list(ROBUSTNESS_SETS))
    json.dumps(result)
    assert result["robustness_sets"] == list(ROBUSTNESS_SETS)
    assert result["cluster_sizes"] == torch.bincount(clusters_of_test_set(digits), minlength=10).tolist()
    robust = result["models"]["convnet"]["robustness"]
    assert list(robust) == list(ROBUSTNESS_SETS)
    for name, summary in robust.items():
        runs = summary["runs"]
        assert len(runs) == 2 and all(0 <= v <= 100 for v in runs), name
        assert summary["mean"] == pytest.approx(sum(runs) / 2)
        assert summary["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2)
    for run in range(2):
        assert robust["cluster_min"]["runs"][run] <= robust["cluster_mean"]["runs"][run]

    # Robustness does not change the networks: same accuracy as without it, and a set's numbers alone are the same.
    plain = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST)
    assert plain["models"]["convnet"]["acc"] == result["models"]["convnet"]["acc"]
    assert "robustness" not in plain["models"]["convnet"] and "robustness_sets" not in plain
    alone = evaluate_synthetic_set(synset, digits, models=["convnet"], config=FAST, robustness="invert")
    assert alone["models"]["convnet"]["robustness"] == {"invert": robust["invert"]}
    assert "cluster_sizes" not in alone


def test_evaluate_robustness_with_holdout_uses_the_test_images_of_the_trained_classes(digits):
    config = EvalConfig(runs=1, epochs=1, batch_size=64)
    result = evaluate_synthetic_set(
        _synset(digits), digits, models=["convnet"], config=config, ood=["holdout:5"], robustness="cluster_mean,noise"
    )
    assert sum(result["cluster_sizes"]) == int((digits.test_labels < 5).sum())
    assert set(result["models"]["convnet"]["robustness"]) == {"cluster_mean", "noise"}


def test_evaluate_rejects_an_unknown_robustness_set_before_training(digits, monkeypatch):
    import fastdd.evaluate.plan as plan

    monkeypatch.setattr(plan, "train_on_synthetic", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(FastddError, match="--robustness-sets must be one of .* got 'snow'"):
        evaluate_synthetic_set(_synset(digits), digits, models=["convnet"], config=FAST, robustness=["snow"])


# --------------------------------------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_evaluate_robustness(digits, tmp_path):
    folder = tmp_path / "synset"
    _synset(digits).save(folder)
    report = tmp_path / "eval.json"
    args = ["evaluate", str(folder), "--runs", "2", "--epochs", "1", "--quiet", "--json", str(report)]
    result = runner.invoke(app, [*args, "--robustness-sets", "invert,cluster_min"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("  robustness (accuracy %"))
    assert "test images per cluster:" in lines[title]
    assert lines[title + 1].split() == ["cluster_min", "invert"]
    data = json.loads(report.read_text())
    assert data["robustness_sets"] == ["cluster_min", "invert"]
    cells = lines[title + 2].split()
    for i, name in enumerate(["cluster_min", "invert"]):
        summary = data["models"]["convnet"]["robustness"][name]
        assert cells[3 * i : 3 * i + 3] == [f"{summary['mean']:.2f}", "±", f"{summary['std']:.2f}"]
    # Right-aligned columns of one width: the header and the row end at the same place.
    assert len(lines[title + 1]) == len(lines[title + 2])


def test_cli_robustness_flag_and_bad_set(digits, tmp_path):
    folder = tmp_path / "synset"
    _synset(digits).save(folder)
    result = runner.invoke(app, ["evaluate", str(folder), "--runs", "1", "--epochs", "1", "--quiet", "--robustness"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "cluster_mean" in line and "±" not in line)
    assert header.split() == list(ROBUSTNESS_SETS)
    bad = runner.invoke(app, ["evaluate", str(folder), "--quiet", "--robustness-sets", "noise,fog"])
    assert bad.exit_code == 2
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'fog'" in lines[0], bad.stderr
