"""Calibration: ECE / NLL against documented and hand-computed values, TS and MTS, the validation splits, plots."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastdd.errors import FastddError
from fastdd.evaluate.calibration import (
    CALIBRATION_METRICS,
    calibration_metrics,
    ece,
    nll,
    save_max_logit_histogram,
    save_reliability_diagram,
)
from fastdd.training import predict_logits
from fastdd.trust.temperature import (
    T_MIN,
    fit_temperature,
    masked_temperature,
    per_class_holdout,
    per_class_sample,
)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------- metrics


def test_ece_equals_the_torchmetrics_documented_example():
    # The example of torchmetrics' multiclass_calibration_error docstring (n_bins=3, norm="l1" -> 0.2000).
    # Its inputs are probabilities; softmax(log p) = p.
    preds = torch.tensor([[0.25, 0.20, 0.55], [0.55, 0.05, 0.40], [0.10, 0.30, 0.60], [0.90, 0.05, 0.05]])
    target = torch.tensor([0, 1, 2, 0])
    assert ece(preds.log(), target, n_bins=3) == pytest.approx(0.2, abs=1e-6)


def test_ece_by_hand_with_two_bins():
    # Top confidences 0.40 (right), 0.45 (wrong) in bin [0, 0.5); 0.70 (right), 0.90 (wrong) in bin [0.5, 1].
    # Bin 1: |0.5 - 0.425| = 0.075; bin 2: |0.5 - 0.8| = 0.3; each holds half the samples -> 0.1875.
    probs = torch.tensor(
        [[0.40, 0.35, 0.25], [0.45, 0.30, 0.25], [0.70, 0.20, 0.10], [0.90, 0.05, 0.05]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 0, 2])
    assert ece(probs.log(), labels, n_bins=2) == pytest.approx(0.1875, abs=1e-6)  # torchmetrics bins in float32


def test_nll_and_metrics_with_a_temperature(generator):
    logits = 3 * torch.randn(50, 4, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    assert nll(logits, labels) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-6)
    m = calibration_metrics(logits, labels, temperature=2.0)
    assert set(CALIBRATION_METRICS) <= set(m) and set(m) == {"ece", "nll", "acc"}
    assert m["nll"] == pytest.approx(float(F.cross_entropy(logits / 2, labels)), rel=1e-6)
    assert m["ece"] == pytest.approx(100 * ece(logits / 2, labels), rel=1e-9)
    assert m["ece"] != pytest.approx(100 * ece(logits, labels), rel=1e-3)
    assert m["acc"] == pytest.approx(100 * float((logits.argmax(1) == labels).float().mean()))
    with pytest.raises(ValueError):
        calibration_metrics(logits, labels, temperature=0.0)


@pytest.mark.parametrize(
    "logits, labels",
    [
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64)),  # N mismatch
        (torch.zeros(4), torch.zeros(4, dtype=torch.int64)),  # logits not [N, K]
        (torch.zeros(4, 3), torch.full((4,), 3)),  # label out of range
    ],
)
def test_metrics_refuse_bad_shapes(logits, labels):
    with pytest.raises(ValueError):
        ece(logits, labels)
    with pytest.raises(ValueError):
        nll(logits, labels)


# ----------------------------------------------------------------------------------------- temperature scaling


@pytest.mark.parametrize("t_true", [0.5, 2.0])
def test_ts_recovers_a_known_temperature(t_true):
    g = _seeded(0)
    z = 3 * torch.randn(20000, 10, generator=g)
    y = torch.multinomial((z / t_true).softmax(dim=1), 1, generator=g).flatten()
    t = fit_temperature(z, y)
    assert t == pytest.approx(t_true, rel=0.03)
    # It is the minimiser: nearby temperatures give a higher NLL.
    assert nll(z / t, y) < min(nll(z / (t * 1.01), y), nll(z / (t / 1.01), y))


def test_ts_is_bounded_when_every_image_is_fitted(generator):
    z = torch.randn(30, 5, generator=generator)
    assert fit_temperature(z, z.argmax(dim=1)) == pytest.approx(T_MIN)  # NLL falls forever as T -> 0


def _tiny_net(seed: int) -> torch.nn.Module:
    g = _seeded(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return net


def test_mts_with_ratio_zero_is_ts_on_s_and_masking_changes_it():
    images = torch.randn(12, 3, 4, 4, generator=_seeded(1))
    labels = torch.arange(12) % 4
    net = _tiny_net(2)
    ts_on_s = fit_temperature(predict_logits(net, images), labels)
    assert masked_temperature(net, images, labels, ratio=0.0, generator=_seeded(3)) == ts_on_s
    idx = per_class_sample(labels, 2, generator=_seeded(3))
    ts_on_sample = fit_temperature(predict_logits(net, images[idx]), labels[idx])
    assert masked_temperature(net, images, labels, ratio=0.0, generator=_seeded(3), per_class=2) == ts_on_sample
    masked = masked_temperature(net, images, labels, ratio=0.5, generator=_seeded(3), repeats=2)
    assert masked != pytest.approx(ts_on_s, rel=1e-3)
    assert masked == masked_temperature(net, images, labels, ratio=0.5, generator=_seeded(3), repeats=2)


def test_soft_labels_are_scaled_against_their_argmax():
    images = torch.randn(8, 3, 4, 4, generator=_seeded(1))
    labels = torch.arange(8) % 4
    soft = F.one_hot(labels, 4).float() * 0.7 + 0.075
    net = _tiny_net(2)
    hard_t = masked_temperature(net, images, labels, ratio=0.3, generator=_seeded(5))
    assert masked_temperature(net, images, soft, ratio=0.3, generator=_seeded(5)) == hard_t


# ---------------------------------------------------------------------------------------------- validation sets


def test_per_class_sample_covers_every_class_equally():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 1, 1, 2, 0, 2, 1])  # class sizes 3, 5, 4
    idx = per_class_sample(labels, 3, generator=_seeded(0))
    assert torch.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert idx.unique().numel() == idx.numel()  # no repeats
    assert not torch.equal(idx, per_class_sample(labels, 3, generator=_seeded(1)))  # a random subset
    idx = per_class_sample(labels, 6, generator=_seeded(0))  # more than every class holds: cycle
    assert torch.bincount(labels[idx]).tolist() == [6, 6, 6]
    uses = torch.bincount(idx, minlength=12)
    assert uses[labels == 0].tolist() == [2, 2, 2]
    assert sorted(uses[labels == 1].tolist()) == [1, 1, 1, 1, 2]
    assert sorted(uses[labels == 2].tolist()) == [1, 1, 2, 2]
    assert torch.equal(per_class_sample(labels, None, generator=_seeded(0)), torch.arange(12))


def test_holdout_splits_every_class():
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor([2, 8, 9, 16]))
    labels = labels[torch.randperm(35, generator=_seeded(1))]
    train, val = per_class_holdout(labels, 0.1, generator=_seeded(0))
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(35))  # disjoint and complete
    assert torch.bincount(labels[val]).tolist() == [1, 1, 1, 2]  # max(1, round(0.1 * n_c))
    assert torch.bincount(labels[train]).tolist() == [1, 7, 8, 14]
    _, val = per_class_holdout(labels, 0.9, generator=_seeded(0))
    assert torch.bincount(labels[val]).tolist() == [1, 7, 8, 14]  # class 0 keeps one training image


def test_holdout_refuses_a_single_image_class():
    labels = torch.tensor([0, 0, 1, 2, 2])
    with pytest.raises(FastddError, match=r"class 1 has a single synthetic image.*--calibration mts"):
        per_class_holdout(labels, 0.1, generator=_seeded(0))


# -------------------------------------------------------------------------------------------------------- plots


def test_plots_are_written(tmp_path, generator):
    logits = 2 * torch.randn(64, 5, generator=generator)
    labels = torch.randint(0, 5, (64,), generator=generator)
    diagram = tmp_path / "plots" / "reliability.png"
    save_reliability_diagram(logits, labels, diagram, title="raw", temperature=1.5)
    histogram = tmp_path / "plots" / "max_logits.png"
    save_max_logit_histogram(
        {"raw": logits.max(dim=1).values, "T=2": logits.max(dim=1).values / 2}, histogram, title="max logits"
    )
    for path in (diagram, histogram):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 1000
    assert math.isfinite(ece(logits, labels))
