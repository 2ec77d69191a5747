"""During-training calibration losses (label smoothing, mixup, focal) against hand formulas, and the objective hook of
train_epoch."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.special import betaincinv
from scipy.stats import kstest

from fastdd.errors import FastddError
from fastdd.training import train_epoch
from fastdd.trust.train_losses import (
    DEFAULT_FOCAL_GAMMA,
    DEFAULT_LABEL_SMOOTHING,
    DEFAULT_MIXUP_ALPHA,
    TRAIN_LOSSES,
    FocalLoss,
    LabelSmoothingLoss,
    MixupLoss,
    train_objective,
)

# The "network" returns its input as logits: inputs [B, K, 1, 1] -> logits [B, K].
IDENTITY = torch.nn.Flatten()


def as_inputs(logits):
    return logits.view(*logits.shape, 1, 1)


def seeded(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_names_defaults_and_repr():
    assert TRAIN_LOSSES == ("ce", "ls", "mixup", "focal")
    assert train_objective("ce", num_classes=10) is None
    ls = train_objective("LS", num_classes=10)
    assert isinstance(ls, LabelSmoothingLoss) and ls.smoothing == DEFAULT_LABEL_SMOOTHING == 0.1
    mixup = train_objective("mixup", num_classes=10)
    assert isinstance(mixup, MixupLoss) and mixup.alpha == DEFAULT_MIXUP_ALPHA
    focal = train_objective("focal", num_classes=10, focal_gamma=2)
    assert isinstance(focal, FocalLoss) and focal.gamma == 2 and DEFAULT_FOCAL_GAMMA == 3
    assert repr(ls) == "LabelSmoothingLoss(num_classes=10, smoothing=0.1)"
    assert repr(mixup) == f"MixupLoss(num_classes=10, alpha={DEFAULT_MIXUP_ALPHA:g})"
    assert repr(focal) == "FocalLoss(num_classes=10, gamma=2)"


def test_unknown_name_lists_the_choices():
    with pytest.raises(FastddError, match="'hinge'.*ce, ls, mixup, focal"):
        train_objective("hinge", num_classes=10)


def test_bad_parameters_are_programmer_errors():
    with pytest.raises(ValueError):
        LabelSmoothingLoss(10, 1.0)
    with pytest.raises(ValueError):
        MixupLoss(10, 0.0)
    with pytest.raises(ValueError):
        FocalLoss(10, -1.0)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        FocalLoss(4)(IDENTITY, as_inputs(torch.zeros(2, 3)), torch.tensor([0, 1]), seeded())


def test_label_smoothing_equals_the_hand_formula(generator):
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 0, 2])
    eps, k = 0.2, 4
    log_p = F.log_softmax(logits, dim=1)
    smoothed = (1 - eps) * F.one_hot(labels, k).double() + eps / k
    expected = -(smoothed * log_p).sum(dim=1).mean()
    loss = LabelSmoothingLoss(k, eps)(IDENTITY, as_inputs(logits), labels, generator)
    torch.testing.assert_close(loss, expected)
    soft = torch.softmax(torch.randn(6, 4, generator=generator, dtype=torch.float64), dim=1)
    expected_soft = -(((1 - eps) * soft + eps / k) * log_p).sum(dim=1).mean()
    torch.testing.assert_close(LabelSmoothingLoss(k, eps)(IDENTITY, as_inputs(logits), soft, generator), expected_soft)
    # one-hot soft targets give the hard-label loss
    one_hot = F.one_hot(labels, k).double()
    torch.testing.assert_close(LabelSmoothingLoss(k, eps)(IDENTITY, as_inputs(logits), one_hot, generator), expected)


def test_focal_with_gamma_zero_is_cross_entropy(generator):
    logits = torch.randn(5, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    soft = torch.softmax(torch.randn(5, 3, generator=generator, dtype=torch.float64), dim=1)
    focal = FocalLoss(3, 0.0)
    torch.testing.assert_close(focal(IDENTITY, as_inputs(logits), labels, generator), F.cross_entropy(logits, labels))
    torch.testing.assert_close(focal(IDENTITY, as_inputs(logits), soft, generator), F.cross_entropy(logits, soft))


def test_focal_hand_case(generator):
    # logits (0, ln 3): p = (1/4, 3/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]], dtype=torch.float64)
    labels = torch.tensor([1, 0])
    gamma = 2.0
    per_image = [-(0.25**gamma) * math.log(0.75), -(0.75**gamma) * math.log(0.25)]
    loss = FocalLoss(2, gamma)(IDENTITY, as_inputs(logits), labels, generator)
    assert loss.item() == pytest.approx(sum(per_image) / 2, rel=1e-12)
    # soft targets (1/2, 1/2): -sum_c q_c (1 - p_c)^gamma log p_c
    soft = torch.full((2, 2), 0.5, dtype=torch.float64)
    expected = -(0.5 * 0.75**gamma * math.log(0.25) + 0.5 * 0.25**gamma * math.log(0.75))
    loss = FocalLoss(2, gamma)(IDENTITY, as_inputs(logits), soft, generator)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_focal_has_finite_gradients_on_certain_predictions(generator):
    logits = torch.tensor([[200.0, 0.0]], requires_grad=True)
    FocalLoss(2, 0.5)(IDENTITY, as_inputs(logits), torch.tensor([0]), generator).backward()
    assert torch.isfinite(logits.grad).all()


def test_mixup_equals_the_hand_mix_drawn_the_documented_way():
    logits = torch.randn(8, 5, generator=seeded(1), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    alpha = 0.4
    hand = seeded(7)
    u = torch.rand((), generator=hand, dtype=torch.float64)
    lam = float(betaincinv(alpha, alpha, float(u)))
    perm = torch.randperm(8, generator=hand)
    mixed = lam * logits + (1 - lam) * logits[perm]
    expected = lam * F.cross_entropy(mixed, labels) + (1 - lam) * F.cross_entropy(mixed, labels[perm])
    g = seeded(7)
    loss = MixupLoss(5, alpha)(IDENTITY, as_inputs(logits), labels, g)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(g.get_state(), hand.get_state())  # exactly the documented draws
    again = MixupLoss(5, alpha)(IDENTITY, as_inputs(logits), labels, seeded(7))
    assert torch.equal(loss, again)
    other = MixupLoss(5, alpha)(IDENTITY, as_inputs(logits), labels, seeded(8))
    assert not torch.equal(loss, other)
    # soft targets: the target distributions are mixed with the same lam and permutation
    soft = torch.softmax(torch.randn(8, 5, generator=seeded(2), dtype=torch.float64), dim=1)
    expected_soft = F.cross_entropy(mixed, lam * soft + (1 - lam) * soft[perm])
    torch.testing.assert_close(MixupLoss(5, alpha)(IDENTITY, as_inputs(logits), soft, seeded(7)), expected_soft)
    one_hot = F.one_hot(labels, 5).double()
    torch.testing.assert_close(MixupLoss(5, alpha)(IDENTITY, as_inputs(logits), one_hot, seeded(7)), expected)


def test_mixup_weight_follows_the_beta_distribution():
    g = seeded(3)
    # Beta(1, 1) is uniform: the quantile map is the identity
    u = torch.rand((), generator=seeded(3), dtype=torch.float64).item()
    assert MixupLoss(2, 1.0).draw(4, g)[0] == pytest.approx(u, abs=1e-12)
    lams = [MixupLoss(2, 0.2).draw(2, g)[0] for _ in range(400)]
    assert all(0.0 <= lam <= 1.0 for lam in lams)
    assert kstest(lams, "beta", args=(0.2, 0.2)).pvalue > 0.001


def test_train_epoch_with_an_objective(generator):
    images = torch.randn(12, 1, 4, 4, generator=generator)
    labels = torch.arange(12) % 3

    def fresh():
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=seeded(5)) * 0.1)
        return net, torch.optim.SGD(net.parameters(), lr=0.1)

    # an objective computing plain cross-entropy reproduces objective=None exactly (the hook draws nothing itself)
    net_a, opt_a = fresh()
    loss_a = train_epoch(net_a, opt_a, images, labels, batch_size=5, generator=seeded(4), dsa_strategy="color_crop")
    net_b, opt_b = fresh()
    seen = []

    def plain(net, x, y, g):
        seen.append((x.shape, g))
        return F.cross_entropy(net(x), y)

    loss_b = train_epoch(
        net_b, opt_b, images, labels, batch_size=5, generator=seeded(4), dsa_strategy="color_crop", objective=plain
    )
    assert loss_a == loss_b and len(seen) == 3 and seen[0][0] == (5, 1, 4, 4)
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        assert torch.equal(p, q)
    # a train loss changes the net differently
    net_c, opt_c = fresh()
    before = [p.detach().clone() for p in net_c.parameters()]
    train_epoch(net_c, opt_c, images, labels, batch_size=5, generator=seeded(4), objective=FocalLoss(3))
    assert all(not torch.equal(p, b) for p, b in zip(net_c.parameters(), before))
    with pytest.raises(ValueError, match="outliers"):
        train_epoch(net_c, opt_c, images, labels, batch_size=5, generator=generator, objective=FocalLoss(3),
                    outliers=images[:2])
