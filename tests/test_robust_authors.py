"""Group-robust distillation as its authors' released code computes it: lower-tail trimmed mean, assignment among all
classes; both options from the library and the command line."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config import DSAConfig
from fastdd.trust.robust import assign_clusters, cluster_trimmed_mean, lower_tail_size, robust_loss


def trimmed_mean_by_hand(values: list[float], alpha: float) -> float:
    """The authors' form, written independently: sort ascending, keep the first int(alpha * n), at least one."""
    kept = sorted(values)[: max(1, int(round(alpha * len(values), 9)))]
    return sum(kept) / len(kept)


def test_lower_tail_size():
    assert [lower_tail_size(n, 0.8) for n in (1, 2, 5, 10, 11)] == [1, 1, 4, 8, 8]
    assert lower_tail_size(10, 0.3) == 3 and lower_tail_size(10, 0.7) == 7  # rounding: 0.3 * 10 = 2.9999999999999996


def test_trimmed_mean_equals_an_independent_one_in_float64():
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(37, generator=g, dtype=torch.float64)
    assign = torch.randint(0, 5, (37,), generator=g)
    assign[assign == 4] = 3  # cluster 4 stays empty
    got = cluster_trimmed_mean(losses, assign, 5, 0.8)
    for c in range(4):
        assert float(got[c]) == pytest.approx(trimmed_mean_by_hand(losses[assign == c].tolist(), 0.8), abs=1e-15)
    assert float(got[4]) == 0.0


def test_trimmed_mean_gradient_is_one_over_k_on_the_kept_losses():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 2.0], dtype=torch.float64, requires_grad=True)
    assign = torch.tensor([0, 0, 0, 0, 0, 1])
    cluster_trimmed_mean(losses, assign, 2, 0.8).sum().backward()
    # cluster 0: int(0.8 * 5) = 4 smallest of (0.5, 0.1, 0.9, 0.3, 0.7) -> all but 0.9; cluster 1: its one loss.
    assert losses.grad.tolist() == [0.25, 0.25, 0.0, 0.25, 0.25, 1.0]
    fresh = losses.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: cluster_trimmed_mean(x, assign, 2, 0.8), (fresh,))


def test_lower_tail_robust_loss_is_ce_plus_mean_and_max_of_the_trimmed_means():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 3, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 3, (12,), generator=g)
    assign = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    ce = F.cross_entropy(logits, targets, reduction="none")
    parts = [trimmed_mean_by_hand(ce[assign == c].tolist(), 0.8) for c in range(3)]
    expected = float(ce.mean()) + sum(parts) / 3 + max(parts)
    assert float(robust_loss(logits, targets, assign, 4, 0.8, tail="lower")) == pytest.approx(expected, abs=1e-13)
    upper = float(robust_loss(logits, targets, assign, 4, 0.8))
    assert not math.isclose(upper, expected)


def test_assignment_among_all_classes():
    real = torch.tensor([[0.0], [0.9], [2.1]])
    real_labels = torch.tensor([0, 0, 1])
    centres = torch.tensor([[0.0], [2.0]])
    centre_labels = torch.tensor([0, 1])
    assert assign_clusters(real, real_labels, centres, centre_labels).tolist() == [0, 0, 1]
    assert assign_clusters(real, real_labels, centres, centre_labels, within_class=False).tolist() == [0, 0, 1]
    real[1] = 1.6  # nearer the other class's centre
    assert assign_clusters(real, real_labels, centres, centre_labels).tolist() == [0, 0, 1]
    assert assign_clusters(real, real_labels, centres, centre_labels, within_class=False).tolist() == [0, 1, 1]


def test_the_options_are_recorded_only_when_chosen():
    assert "cvar_tail" not in DSAConfig(robust=True).to_dict()
    recorded = DSAConfig(robust=True, cvar_tail="lower", robust_assign="all").to_dict()
    assert (recorded["cvar_tail"], recorded["robust_assign"]) == ("lower", "all")


def test_the_command_line_runs_the_authors_form(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "distill", "--method", "dm", "--ipc", "2", "--width", "8", "--batch-real", "16", "--robust-batch", "16",
        "--iterations", "2", "--robust", "--cvar-tail", "lower", "--robust-assign", "all", "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    hyper = json.loads((out / "synset.json").read_text())["hyperparameters"]
    assert (hyper["cvar_tail"], hyper["robust_assign"]) == ("lower", "all")
