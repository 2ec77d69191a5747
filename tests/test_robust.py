"""Group-robust distillation: CVaR and the robust loss on hand cases, farthest-point centres, class-restricted
clusters, the network update of dc/dsa/dm on real data, resume, and the refusals."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.distill.dc import real_steps_for
from fastdd.distill.draws import draw_generator
from fastdd.errors import FastddError
from fastdd.models import build_model
from fastdd.ops import cluster_cvar, group_cvar_loss
from fastdd.trust.group_robust import GroupRobust
from fastdd.trust.robust import (
    RobustObjective,
    assign_clusters,
    cluster_centres,
    default_clusters,
    farthest_point_centres,
    logits_and_embedding,
    robust_loss,
)

WIDTH = 8
# Tiny runs: ipc 2, 2 iterations, 16 real images per class in each network step.
RUNS = {
    "dc": dict(ipc=2, iterations=2, width=WIDTH, batch_real=8, outer_loop=2, inner_loop=1, robust_batch=16),
    "dsa": dict(ipc=2, iterations=2, width=WIDTH, batch_real=8, outer_loop=2, inner_loop=1, robust_batch=16),
    "dm": dict(ipc=2, iterations=2, width=WIDTH, batch_real=8, robust_batch=16),
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(method, digits, **overrides):
    options = {**RUNS.get(method, dict(ipc=1, iterations=1, width=WIDTH)), "robust": True, **overrides}
    cls = get_distiller(method)
    return cls(cls.config_class.from_options(options, method=method), digits)


def logits_with_losses(losses):
    """Two-class logits whose cross-entropy against class 0 is exactly ``losses``: [0, log(e^L - 1)]."""
    return torch.stack([torch.zeros_like(losses), torch.log(torch.expm1(losses))], dim=1)


# -- CVaR and the robust loss on hand cases ------------------------------------------------------------------------

# Cluster 0: 5 losses, alpha*n = 2.5 -> the 3 largest {5, 3, 2}: 10/3.
# Cluster 1: {4, 2, 2}, alpha*n = 1.5 -> 2 kept; the tie at the boundary keeps the lower index (6, not 7): 3.
# Cluster 2: empty -> 0, and left out of the mean and max.  Cluster 3: {7} -> 7.
HAND_LOSSES = [1.0, 5.0, 3.0, 2.0, 0.5, 4.0, 2.0, 2.0, 7.0]
HAND_ASSIGN = [0, 0, 0, 0, 0, 1, 1, 1, 3]
HAND_CVAR = [10 / 3, 3.0, 0.0, 7.0]
HAND_GROUP = (10 / 3 + 3 + 7) / 3 + 7  # mean over the 3 non-empty clusters + max
# d group / d loss_i: 1/3 * 1/k_g on the kept losses (mean), + 1/k_3 on cluster 3's (max).
HAND_GROUP_GRAD = [0, 1 / 9, 1 / 9, 1 / 9, 0, 1 / 6, 1 / 6, 0, 1 / 3 + 1]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_cvar_hand_case(backend):
    losses = torch.tensor(HAND_LOSSES, dtype=torch.float64, requires_grad=True)
    assign = torch.tensor(HAND_ASSIGN)
    cvar = cluster_cvar(losses, assign, 4, 0.5, backend=backend)
    torch.testing.assert_close(cvar, torch.tensor(HAND_CVAR, dtype=torch.float64), rtol=1e-14, atol=0)
    group = group_cvar_loss(losses, assign, 4, 0.5, backend=backend)
    assert math.isclose(group.item(), HAND_GROUP, rel_tol=1e-14)
    (grad,) = torch.autograd.grad(group, losses)
    torch.testing.assert_close(grad, torch.tensor(HAND_GROUP_GRAD, dtype=torch.float64), rtol=1e-14, atol=1e-15)


def test_robust_loss_hand_case():
    losses = torch.tensor(HAND_LOSSES, dtype=torch.float64, requires_grad=True)
    logits = logits_with_losses(losses)
    value = robust_loss(logits, torch.zeros(9, dtype=torch.int64), torch.tensor(HAND_ASSIGN), 4, 0.5)
    expected = sum(HAND_LOSSES) / 9 + HAND_GROUP  # 26.5 / 9 + 40 / 9 + 7 = 14.3888...
    assert math.isclose(value.item(), expected, rel_tol=1e-12) and math.isclose(expected, 14.388888888888889)
    # The CVaR term reaches the gradient: 1/9 from the mean CE plus the hand weights of the group term.
    (grad,) = torch.autograd.grad(value, losses)
    torch.testing.assert_close(grad, torch.tensor([1 / 9 + w for w in HAND_GROUP_GRAD], dtype=torch.float64))


def test_robust_loss_gradient_equals_a_manual_formula(generator):
    """Against autograd through topk written out per cluster (distinct losses, so no tie decides anything)."""
    logits = torch.randn(40, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (40,), generator=generator)
    assign = torch.randint(0, 6, (40,), generator=generator)
    assign[assign == 4] = 5  # cluster 4 empty
    alpha = 0.7
    value = robust_loss(logits, targets, assign, 6, alpha)
    per_sample = -logits.log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    cvars = []
    for g in range(6):
        members = per_sample[assign == g]
        if members.numel():
            cvars.append(members.topk(math.ceil(round(alpha * members.numel(), 9))).values.mean())
    cvars = torch.stack(cvars)
    manual = per_sample.mean() + cvars.mean() + cvars.max()
    torch.testing.assert_close(value, manual, rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(value, logits)
    (manual_grad,) = torch.autograd.grad(manual, logits)
    torch.testing.assert_close(grad, manual_grad, rtol=1e-12, atol=1e-15)
    (ce_grad,) = torch.autograd.grad(F.cross_entropy(logits, targets), logits)
    assert (grad - ce_grad).abs().max() > 1e-3, "the CVaR term does not reach the gradient"


# -- centres and clusters ------------------------------------------------------------------------------------------


def test_farthest_point_centres_known_answer():
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0], [9.5]])
    # From row 0: 10 is farthest; then 4 (16 from 0, 36 from 10); then 1 (1 from 0) beats 9.5 (0.25 from 10).
    assert farthest_point_centres(points, 4).tolist() == [0, 2, 3, 1]
    assert farthest_point_centres(points, 1).tolist() == [0]
    # Ties go to the lowest row; duplicates still give distinct rows.
    assert farthest_point_centres(torch.tensor([[0.0], [-1.0], [1.0]]), 2).tolist() == [0, 1]
    assert farthest_point_centres(torch.zeros(3, 2), 3).tolist() == [0, 1, 2]


def test_farthest_point_centres_random_start(generator):
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0], [9.5]])
    start = int(torch.randint(5, (1,), generator=torch.Generator().manual_seed(0)))
    picked = farthest_point_centres(points, 2, generator=generator)
    farthest = int((points - points[start]).square().sum(1).argmax())
    assert picked.tolist() == [start, farthest]


@pytest.mark.parametrize("k", [0, 6, 2.0])
def test_farthest_point_centres_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        farthest_point_centres(torch.zeros(5, 2), k)


def test_cluster_centres_are_class_major():
    features = torch.tensor([[0.0], [5.0], [1.0], [100.0], [0.0], [-3.0], [2.0]])
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1])
    # Class 0 = rows 0, 2, 4 (values 0, 1, 0); class 1 = rows 1, 3, 5, 6 (values 5, 100, -3, 2).
    assert cluster_centres(features, labels, 2, 2).tolist() == [0, 2, 1, 3]
    assert cluster_centres(features, labels, 2, 3).tolist() == [0, 2, 4, 1, 3, 5]
    with pytest.raises(ValueError, match="class 0 has 3"):
        cluster_centres(features, labels, 2, 4)


def test_default_clusters():
    assert [default_clusters(ipc) for ipc in (1, 2, 10, 11, 50)] == [1, 2, 10, 10, 10]


def test_assignment_is_restricted_to_the_class():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    centre_labels = torch.tensor([0, 0, 1, 1])
    real = torch.tensor([[1.0, 1.0], [9.0, 9.0], [9.0, 9.0], [5.0, 0.0]])
    real_labels = torch.tensor([1, 0, 1, 0])
    # (1, 1) of class 1 is nearest to centre 0 overall but joins class 1's (0, 10); (9, 9) of class 0 joins (10, 0);
    # (5, 0) is equally far from both class-0 centres: the lower index.
    assert assign_clusters(real, real_labels, centres, centre_labels).tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("space", ["pixel", "embed"])
def test_objective_assignment(space, generator):
    net = build_model("convnet", channels=1, num_classes=2, image_size=8, width=4, norm="batchnorm",
                      generator=generator)
    real = torch.randn(12, 1, 8, 8, generator=generator)
    real_labels = torch.tensor([0, 1] * 6)
    synthetic = torch.randn(6, 1, 8, 8, generator=generator)
    synthetic_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    objective = RobustObjective(num_classes=2, clusters_per_class=2, alpha=0.8, space=space)
    stats = copy.deepcopy(net.state_dict())
    net.train()
    assign = objective.assign(net, real, real_labels, synthetic, synthetic_labels)
    assert net.training, "the network's mode was not restored"
    for key, value in net.state_dict().items():
        assert torch.equal(value, stats[key]), f"{key} changed while computing features"
    with torch.no_grad():
        net.eval()
        features = (lambda x: x.flatten(1)) if space == "pixel" else net.embed
        real_f, syn_f = features(real), features(synthetic)
    centres = cluster_centres(syn_f, synthetic_labels, 2, 2)
    assert torch.equal(assign, assign_clusters(real_f, real_labels, syn_f[centres], synthetic_labels[centres]))
    assert bool((assign // 2 == real_labels).all()), "a real image joined a cluster of another class"


@pytest.mark.parametrize("norm", ["instancenorm", "batchnorm"])
def test_training_forward_shares_the_embedding(norm, generator):
    """Embed-space clusters from the training forward equal those of a separate eval-mode ``embed`` pass."""
    net = build_model("convnet", channels=1, num_classes=2, image_size=8, width=4, norm=norm, generator=generator)
    real = torch.randn(10, 1, 8, 8, generator=generator)
    real_labels = torch.tensor([0, 1] * 5)
    synthetic = torch.randn(6, 1, 8, 8, generator=generator)
    synthetic_labels = torch.tensor([0, 0, 0, 1, 1, 1])
    net.train()
    logits, features = logits_and_embedding(net, real)
    torch.testing.assert_close(logits, net(real))
    if norm == "batchnorm":
        assert features is None  # train-mode batch statistics differ from embed() in eval mode
        return
    assert not features.requires_grad
    net.eval()
    torch.testing.assert_close(features, net.embed(real))
    net.train()
    objective = RobustObjective(num_classes=2, clusters_per_class=2)
    shared = objective.assign(net, real, real_labels, synthetic, synthetic_labels, real_features=features)
    assert torch.equal(shared, objective.assign(net, real, real_labels, synthetic, synthetic_labels))


# -- the distillers ------------------------------------------------------------------------------------------------


def test_real_steps_rule():
    assert [real_steps_for(50, 10, 256), real_steps_for(10, 50, 256), real_steps_for(1, 1, 256)] == [2, 2, 1]
    assert real_steps_for(0, 10, 256) == 0 and real_steps_for(50, 10, 16) == 31


def test_network_step_on_real_data_uses_the_robust_loss(digits):
    """One network step of dc: the returned loss is the robust loss of a batch drawn the same way by hand."""
    distiller = make("dc", digits, lr_net=0.0)
    net = distiller.new_network(torch.Generator().manual_seed(0))
    generator = draw_generator(0, "net_real", 5, 1, 0)  # step 0 of the network update at (iteration 5, outer 1)
    index = digits.class_index()
    real = torch.cat([digits.train_images[index.sample(c, 16, generator)] for c in range(10)])
    labels = torch.arange(10).repeat_interleave(16)
    objective = distiller.plugins.get(GroupRobust).objective
    assert (objective.clusters_per_class, objective.alpha, objective.space) == (2, 0.8, "embed")
    assign = objective.assign(net, real, labels, distiller.images, distiller.labels)
    expected = robust_loss(net(real), labels, assign, 20, 0.8).item()
    got = distiller.train_network_on_real(net, torch.optim.SGD(net.parameters(), lr=0.0), 1, (5, 1))
    assert math.isclose(got, expected, rel_tol=1e-6)
    assert expected > F.cross_entropy(net(real), labels).item() + 1.0  # the CVaR terms are there


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_robust_run(method, digits, tmp_path):
    distiller = make(method, digits)
    assert distiller.net_data == "real"
    start = distiller.images.detach().clone()
    metrics = distiller.step(0)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["net_loss"])
    synset = run_distillation(make(method, digits), tmp_path / "run", progress=False)
    assert torch.isfinite(synset.images).all() and not torch.equal(synset.images, start)
    assert synset.meta["hyperparameters"]["robust"] is True


@pytest.mark.parametrize("method", ["dsa", "dm"])
def test_robust_objective_changes_the_result(method, digits, tmp_path):
    """Same seed, same real batches: CE alone on real data and the robust loss give different synthetic sets."""
    robust = run_distillation(make(method, digits), tmp_path / "robust", progress=False)
    plain = run_distillation(make(method, digits, robust=False, net_data="real"), tmp_path / "ce", progress=False)
    assert not torch.equal(robust.images, plain.images)


def test_robust_with_outliers(digits, tmp_path):
    synset = run_distillation(make("dsa", digits, outliers="poe"), tmp_path / "run", progress=False)
    assert torch.isfinite(synset.images).all() and torch.isfinite(synset.outlier_images).all()


def test_dm_resume_equals_uninterrupted(digits, tmp_path):
    options = dict(iterations=3, net_refresh=2, net_steps=2)
    full = run_distillation(make("dm", digits, **options), tmp_path / "full", progress=False)
    run_distillation(make("dm", digits, **{**options, "iterations": 1}), tmp_path / "part", progress=False)
    resumed = run_distillation(make("dm", digits, **options), tmp_path / "part", resume=True, progress=False)
    assert torch.equal(resumed.images, full.images)


def test_dm_keeps_and_refreshes_its_network(digits):
    distiller = make("dm", digits, net_refresh=2)
    distiller.step(0)
    first = distiller.net
    distiller.step(1)
    assert distiller.net is first and distiller.net_optimizer.state, "the network was not kept"
    distiller.step(2)
    assert distiller.net is not first, "the network was not re-initialised at iteration 2"


@pytest.mark.parametrize("method", ["mtt", "tesla", "tesla-compat"])
def test_trajectory_methods_refuse_robust(method, digits):
    with pytest.raises(FastddError, match=f"--robust does not apply to {method}: .*experts"):
        make(method, digits)


@pytest.mark.parametrize("method,options,message", [
    ("dsa", dict(net_data="synthetic"), "needs --net-data real"),
    ("dm", dict(net_data="random"), "needs --net-data real"),
    ("dc", dict(ipc=1, outer_loop=None, inner_loop=None), "--outer-loop 1"),
    ("dm", dict(cvar_alpha=0.0), "--cvar-alpha"),
    ("dm", dict(clusters=3), "--clusters"),
    ("dm", dict(cluster_space="latent"), "--cluster-space"),
    ("dm", dict(robust_batch=0), "--robust-batch"),
    ("dm", dict(net_refresh=0), "--net-refresh"),
    ("dc", dict(net_data="noise"), "--net-data"),
])
def test_bad_robust_options_are_user_errors(method, options, message, digits):
    with pytest.raises(FastddError, match=message):
        make(method, digits, **options)


def test_cli_distill_robust(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "distill", "--method", "dm", "--ipc", "2", "--iterations", "1", "--width", "8", "--batch-real", "8",
        "--robust", "--cvar-alpha", "0.5", "--clusters", "1", "--cluster-space", "pixel", "--robust-batch", "8",
        "--net-steps", "2", "--net-refresh", "5", "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "synset.json").read_text())["hyperparameters"]
    assert (saved["robust"], saved["cvar_alpha"], saved["clusters"], saved["cluster_space"]) == (True, 0.5, 1, "pixel")
    assert (saved["robust_batch"], saved["net_steps"], saved["net_refresh"]) == (8, 2, 5)
