"""OAL: the CLUB estimate on a hand case and on (in)dependent data, k-NN distances against brute force, boundary
anchors and per-anchor candidate selection, the OAL objective (gradients, q steps, determinism, plain CE at zero
weights), and loading a teacher from experts or checkpoints."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastdd.data import load_dataset
from fastdd.distill.experts import ExpertConfig, train_experts
from fastdd.errors import FastddError
from fastdd.expert_files import load_experts
from fastdd.models import build_model
from fastdd.trust.boundary_outliers import (
    boundary_anchor_indices,
    boundary_outliers,
    knn_distances,
)
from fastdd.trust.club import CLUB
from fastdd.trust.oal import OALObjective, OutlierBank, oal_objective
from fastdd.trust.teacher import load_teacher


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# -- CLUB -----------------------------------------------------------------------------------------------------------


def test_club_estimate_matches_the_formula_on_a_hand_case():
    # x in R^2 with positive entries, one hidden unit per input (hidden=4 -> 2 units): mu = A x + c, logvar = tanh(B x).
    club = CLUB(2, 2, 4, generator=seeded()).double()
    A = torch.tensor([[1.0, -0.5], [0.25, 2.0]], dtype=torch.float64)
    B = torch.tensor([[0.3, 0.0], [-0.2, 0.4]], dtype=torch.float64)
    c = torch.tensor([0.1, -0.3], dtype=torch.float64)
    with torch.no_grad():
        for net, weight, bias in ((club.mean_net, A, c), (club.logvar_net, B, torch.zeros(2, dtype=torch.float64))):
            net[0].weight.copy_(torch.eye(2, dtype=torch.float64))
            net[0].bias.zero_()
            net[2].weight.copy_(weight)
            net[2].bias.copy_(bias)
    x = torch.tensor([[0.5, 1.0], [2.0, 0.1], [1.5, 1.5]], dtype=torch.float64)
    y = torch.tensor([[0.2, 1.0], [-1.0, 0.5], [0.7, 3.0]], dtype=torch.float64)

    def log_q(yj, xi):  # full Gaussian log-density of yj under q(. | xi), by hand
        total = 0.0
        for d in range(2):
            mu = sum(A[d, e].item() * xi[e].item() for e in range(2)) + c[d].item()
            logvar = math.tanh(sum(B[d, e].item() * xi[e].item() for e in range(2)))
            total += -0.5 * ((yj[d].item() - mu) ** 2 / math.exp(logvar) + logvar + math.log(2 * math.pi))
        return total

    n = 3
    expected = sum(log_q(y[i], x[i]) - sum(log_q(y[j], x[i]) for j in range(n)) / n for i in range(n)) / n
    assert club.mi_upper_bound(x, y).item() == pytest.approx(expected, abs=1e-12)
    likelihood = sum(log_q(y[i], x[i]) for i in range(n)) / n
    assert club.log_likelihood(x, y).item() == pytest.approx(likelihood, abs=1e-12)
    assert club.learning_loss(x, y).item() == pytest.approx(-likelihood, abs=1e-12)


def _trained_club(x, y, steps=300):
    club = CLUB(x.shape[1], y.shape[1], 32, generator=seeded(1))
    optimizer = torch.optim.Adam(club.parameters(), lr=1e-2)
    start = club.log_likelihood(x, y).item()
    for _ in range(steps):
        optimizer.zero_grad()
        club.learning_loss(x, y).backward()
        optimizer.step()
    return club, start


def test_club_learns_the_likelihood_and_separates_dependent_from_independent_data():
    g = seeded(2)

    def sample(n):
        x = torch.randn(n, 2, generator=g)
        return x, x + 0.1 * torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)

    x, dependent, independent = sample(512)
    club, start = _trained_club(x, dependent)
    assert club.log_likelihood(x, dependent).item() > start + 1.0
    club_independent, _ = _trained_club(x, independent)
    # estimated on fresh samples: q fitted to 512 pairs also fits their chance correlation
    x, dependent, independent = sample(4096)
    assert club.mi_upper_bound(x, dependent).item() > 1.0
    assert abs(club_independent.mi_upper_bound(x, independent).item()) < 0.05


# -- k-NN distances and boundary outliers ---------------------------------------------------------------------------


def _brute_kth(queries, bank, k, exclude_self=False):
    dist = (queries[:, None, :] - bank[None, :, :]).square().sum(dim=2).sqrt()
    if exclude_self:
        dist.fill_diagonal_(float("inf"))
    return dist.sort(dim=1).values[:, k - 1]


@pytest.mark.parametrize("k", [1, 2, 5, 8, 9, 13])
@pytest.mark.parametrize("chunk", [None, 3])
def test_knn_distances_match_a_brute_force_sort(k, chunk):
    g = seeded(3)
    bank = torch.randn(14, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(11, 5, generator=g, dtype=torch.float64)
    got = knn_distances(queries, bank, k, chunk=chunk)
    torch.testing.assert_close(got, _brute_kth(queries, bank, k), rtol=1e-9, atol=1e-9)
    got_self = knn_distances(bank, bank, k, exclude_self=True, chunk=chunk)
    torch.testing.assert_close(got_self, _brute_kth(bank, bank, k, exclude_self=True), rtol=1e-9, atol=1e-9)


def test_knn_distances_refuse_bad_k():
    bank = torch.randn(4, 2)
    with pytest.raises(ValueError):
        knn_distances(bank, bank, 4, exclude_self=True)
    with pytest.raises(ValueError):
        knn_distances(bank, bank, 0)


def test_boundary_anchors_are_the_far_points():
    g = seeded(4)
    cluster = torch.tensor([1.0, 0.0, 0.0]) + 0.01 * torch.randn(30, 3, generator=g)
    far = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    features = torch.cat([cluster[:13], far[:2], cluster[13:], far[2:]]) * 3.0  # scale: normalised away
    far_rows = {13, 14, 32, 33}
    anchors = boundary_anchor_indices(features, k=3, num_anchors=4)
    assert set(anchors.tolist()) == far_rows
    # k is clamped to n - 1 and the anchors to n
    assert boundary_anchor_indices(features[:5], k=300, num_anchors=10).numel() == 5


def test_boundary_outliers_keep_each_anchors_farthest_candidates():
    g = seeded(5)
    features = torch.randn(40, 6, generator=g).abs()
    k, anchors_wanted, samples, keep, sigma = 4, 3, 10, 3, 0.2
    draw = seeded(6)
    out = boundary_outliers(features, generator=draw, k=k, num_anchors=anchors_wanted, samples_per_anchor=samples,
                            keep=keep, sigma=sigma)
    assert out.shape == (anchors_wanted * keep, 6)
    normed = F.normalize(features, dim=1)
    anchors = normed[boundary_anchor_indices(features, k=k, num_anchors=anchors_wanted)]
    replay = seeded(6)
    for a in range(anchors_wanted):
        candidates = anchors[a] + sigma * torch.randn(samples, 6, generator=replay)
        dist = knn_distances(F.normalize(candidates, dim=1), normed, k)
        kept = out[a * keep : (a + 1) * keep]
        # the kept rows are this anchor's candidates ...
        match = torch.cdist(kept, candidates).argmin(dim=1)
        torch.testing.assert_close(kept, candidates[match])
        # ... farthest first, and every kept one is farther than every dropped one
        kept_dist = dist[match]
        assert torch.all(kept_dist[:-1] >= kept_dist[1:])
        dropped = torch.ones(samples, dtype=torch.bool)
        dropped[match] = False
        assert kept_dist.min() >= dist[dropped].max()


# -- the OAL objective ----------------------------------------------------------------------------------------------


def _nets(seed=0):
    g = seeded(seed)
    teacher = build_model("convnet", channels=1, num_classes=3, image_size=8, width=8, generator=g)
    teacher.eval().requires_grad_(False)
    student = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, generator=g)
    return teacher, student


def _real(seed=7):
    g = seeded(seed)
    return torch.randn(45, 1, 8, 8, generator=g), torch.arange(3).repeat(15)


def _objective(teacher, student, seed=8, **options):
    images, labels = _real()
    bank = OutlierBank.from_real(teacher, images, labels, num_classes=3, generator=seeded(seed), per_class=10,
                                 num_anchors=6, samples_per_anchor=12, keep=2, hidden=16, club_hidden=16, **options)
    return bank.objective(student, generator=seeded(seed + 1))


def test_oal_objective_gradients_reach_the_net_and_projections_but_not_q():
    teacher, student = _nets()
    teacher_before = [p.clone() for p in teacher.parameters()]
    objective = _objective(teacher, student)
    assert objective.outliers.shape == (12, teacher.feature_dim)
    q_before = [p.clone() for p in objective.q_parameters()]
    images, labels = _real(9)
    loss = objective(student.train(), images[:8], labels[:8], seeded(10))
    assert torch.isfinite(loss)
    assert set(objective.last_parts) == {"ce", "kl_logits", "kl_features", "micl", "q_nll", "total"}
    # q took its own steps inside the call, and left no gradient behind
    assert any(not torch.equal(a, b) for a, b in zip(q_before, objective.q_parameters()))
    q_after = [p.clone() for p in objective.q_parameters()]
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in objective.q_parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    for module in (objective.phi, objective.proj):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # the trainable parameters the evaluation loop hands to SGD: phi and proj only
    trainable = {id(p) for p in objective.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (objective.phi, objective.proj) for p in m.parameters()}
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1, weight_decay=5e-4)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(q_after, objective.q_parameters()))
    # the teacher is untouched and not part of the objective's modules
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(teacher_before, teacher.parameters()))
    assert not teacher.training
    assert all(id(p) not in {id(q) for q in objective.parameters()} for p in teacher.parameters())


def test_oal_objective_is_deterministic_given_the_seeds():
    results = []
    for _ in range(2):
        teacher, student = _nets()
        objective = _objective(teacher, student)
        images, labels = _real(9)
        loss = objective(student.train(), images[:8], labels[:8], seeded(10))
        results.append((loss.detach(), [p.detach().clone() for p in objective.q_parameters()], objective.outliers))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][2], results[1][2])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("soft", [False, True])
def test_zero_weights_give_plain_cross_entropy(soft):
    teacher, student = _nets()
    objective = _objective(teacher, student, a1=0.0, a2=0.0, beta=0.0)
    images, labels = _real(9)
    targets = F.one_hot(labels[:8], 3).float() * 0.8 + 0.2 / 3 if soft else labels[:8]
    loss = objective(student.train(), images[:8], targets, seeded(10))
    torch.testing.assert_close(loss, F.cross_entropy(student(images[:8]), targets), rtol=0, atol=0)
    assert set(objective.last_parts) == {"ce", "total"}


def test_the_extra_outlier_source_adds_the_gamma_term():
    teacher, student = _nets()
    calls = []

    def source(n, generator):
        calls.append(n)
        return torch.randn(n, 5, generator=generator)

    objective = _objective(teacher, student, extra_outliers=source, extra_dim=5)
    images, labels = _real(9)
    loss = objective(student.train(), images[:8], labels[:8], seeded(10))
    assert calls == [8] and torch.isfinite(loss)
    assert {"micl_extra", "q_nll_extra"} <= set(objective.last_parts)
    loss.backward()
    assert all(p.grad is not None for p in objective.extra_proj.parameters())
    assert all(p.grad is None for p in objective.extra_club.parameters())


def test_oal_objective_function_defaults_to_the_teachers_feature_size():
    teacher, _ = _nets()
    images, labels = _real()
    objective = oal_objective(teacher, images, labels, num_classes=3, generator=seeded(11), per_class=5, k=3,
                              num_anchors=4, samples_per_anchor=6, keep=1)
    assert isinstance(objective, OALObjective)
    assert objective.outliers.shape == (4, teacher.feature_dim)
    assert objective.phi[-1].out_features == teacher.feature_dim


# -- the teacher ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts_folder(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    config = ExpertConfig(dataset="digits", width=8, num_experts=1, epochs=1, dsa=False, seed=1)
    train_experts(config, digits, folder, progress=False)
    return folder


def _synset_meta(digits, **extra):
    return {
        "method": "mtt", "dataset": digits.name, "model": "convnet", "num_classes": digits.num_classes,
        "image_shape": [digits.channels, *digits.image_size], "mean": list(digits.mean), "std": list(digits.std),
        "zca": False, "hyperparameters": {"model": "convnet", "width": 8, "depth": None, "norm": "instancenorm"},
        **extra,
    }


def _shape(digits, num_classes=None):
    return SimpleNamespace(channels=digits.channels, num_classes=num_classes or digits.num_classes,
                           image_size=digits.image_size)


def _assert_teacher(net, flat):
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(net.parameters()), flat, rtol=0, atol=0)


def test_load_teacher_from_experts(digits, experts_folder):
    experts = load_experts(experts_folder)
    final = experts.snapshot(0, experts.num_snapshots - 1)
    meta = _synset_meta(digits, experts=str(experts_folder))
    shape = _shape(digits, num_classes=4)  # a task on fewer classes: the teacher keeps all of them
    _assert_teacher(load_teacher("expert", synset_meta=meta, shape=shape), final)
    _assert_teacher(load_teacher(str(experts_folder), synset_meta={"model": "alexnet"}, shape=shape), final)
    expert_file = str(experts_folder / "expert_0000.safetensors")
    _assert_teacher(load_teacher(expert_file, synset_meta=meta, shape=shape), final)


def test_load_teacher_from_checkpoints(digits, tmp_path):
    net = build_model("convnet", channels=1, num_classes=10, image_size=8, width=8, generator=seeded(12))
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    meta, shape = _synset_meta(digits), _shape(digits)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "net.safetensors"))
    torch.save(net.state_dict(), tmp_path / "net.pt")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save(flat, tmp_path / "flat.pt")
    for name in ("net.safetensors", "net.pt", "wrapped.pth", "flat.pt"):
        _assert_teacher(load_teacher(str(tmp_path / name), synset_meta=meta, shape=shape), flat)


class _Pickled:
    pass


def test_load_teacher_refuses_what_it_cannot_use(digits, experts_folder, tmp_path):
    meta, shape = _synset_meta(digits), _shape(digits)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    torch.save({"obj": _Pickled()}, tmp_path / "pickled.pt")
    other = build_model("convnet", channels=1, num_classes=10, image_size=8, width=16, generator=seeded(13))
    torch.save(other.state_dict(), tmp_path / "wider.pt")
    bad = [str(tmp_path / name) for name in ("missing.pt", "notes.txt", "broken.safetensors", "pickled.pt",
                                             "wider.pt")]
    bad.append(str(tmp_path))  # a folder without experts.json
    for spec in bad:
        with pytest.raises(FastddError):
            load_teacher(spec, synset_meta=meta, shape=shape)
    with pytest.raises(FastddError, match="--teacher PATH"):
        load_teacher("expert", synset_meta=meta, shape=shape)
    with pytest.raises(FastddError, match="dataset"):
        load_teacher(str(experts_folder), synset_meta={**meta, "dataset": "fashionmnist"}, shape=shape)


@pytest.mark.parametrize("kl", ["student-teacher", "teacher-student"])
def test_oal_kl_direction(kl):
    """``teacher-student`` is the authors' ``KLDivLoss(log_softmax(student), softmax(teacher))`` (batch mean);
    ``student-teacher`` the paper's KL(student || teacher)."""
    teacher, student = _nets()
    objective = _objective(teacher, student, kl=kl)
    images, labels = _real(9)
    objective(student.train(), images[:8], labels[:8], seeded(10))
    with torch.no_grad():
        s_logits, t_logits = student(images[:8]), teacher(images[:8])
    if kl == "teacher-student":
        expected = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1))
    else:
        expected = (F.softmax(s_logits, 1) * (F.log_softmax(s_logits, 1) - F.log_softmax(t_logits, 1))).sum(1).mean()
    assert float(objective.last_parts["kl_logits"]) == pytest.approx(float(expected), rel=1e-5)


def test_oal_kl_is_an_evaluate_option():
    from fastdd.config.evaluate import EvaluateConfig

    assert EvaluateConfig().oal_kl == "student-teacher"
    with pytest.raises(FastddError, match="--oal-kl must be one of student-teacher, teacher-student"):
        EvaluateConfig(oal_kl="both")
