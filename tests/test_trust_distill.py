"""TrustDD outliers inside the distillers: every method learns S_out, the student step uses the integrated loss,
the exact adjoint still equals the unroll, experts record their outlier setting, and a run resumes exactly."""

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from fastdd.data import load_dataset
from fastdd.distill import get_distiller, match_gradients, run_distillation
from fastdd.distill.experts import ExpertConfig, expected_metadata, settings_digest, train_experts
from fastdd.errors import FastddError
from fastdd.expert_files import load_experts
from fastdd.io import SyntheticSet
from fastdd.models import build_model, flat_parameters, functional_forward
from fastdd.trust.outlier_exposure import OutlierExposure
from fastdd.trust.outlier_loss import integrated_loss, uniform_cross_entropy

WIDTH = 8
GRADIENT_METHODS = {
    "dc": dict(ipc=1, iterations=2, width=WIDTH, batch_real=8, outer_loop=2, inner_loop=1),
    "dsa": dict(ipc=1, iterations=2, width=WIDTH, batch_real=8, outer_loop=2, inner_loop=1),
    "dm": dict(ipc=2, iterations=2, width=WIDTH, batch_real=8),
}
TRAJECTORY = dict(ipc=1, iterations=2, width=WIDTH, syn_steps=2, expert_epochs=1, max_start_epoch=1, lr_img=10.0,
                  lr_lr=1e-5, num_experts=1, expert_train_epochs=2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(method, digits, **overrides):
    options = {**(GRADIENT_METHODS.get(method) or TRAJECTORY), "outliers": "poe", **overrides}
    cls = get_distiller(method)
    return cls(cls.config_class.from_options(options, method=method), digits)


def synthetic_outliers(distiller):
    """S_out of the distiller's TrustDD plug-in, or None when it has none."""
    plugin = distiller.plugins.get(OutlierExposure)
    return None if plugin is None else plugin.images


@pytest.mark.parametrize("method", ["dc", "dsa", "dm", "mtt", "tesla"])
def test_poe_run_learns_and_saves_outliers(method, digits, tmp_path):
    distiller = make(method, digits)
    start = synthetic_outliers(distiller).detach().clone()
    assert start.shape == (distiller.images.shape[0], 1, 8, 8)  # outlier ratio 1
    out = tmp_path / "run"
    synset = run_distillation(distiller, out, progress=False)
    assert synset.outlier_images is not None and torch.isfinite(synset.outlier_images).all()
    assert not torch.equal(synset.outlier_images, start), "S_out was never updated"
    assert (out / "synset_outliers.png").is_file() and (out / "synset.png").is_file()
    loaded = SyntheticSet.load(out)
    assert torch.equal(loaded.outlier_images, synset.outlier_images)
    meta = json.loads((out / "synset.json").read_text())
    assert meta["outliers"]["mode"] == "poe" and meta["outliers"]["count"] == start.shape[0]
    assert meta["outliers"]["weight"] == 0.5


def test_outlier_ratio_sets_the_count(digits):
    assert synthetic_outliers(make("dm", digits, outlier_ratio=0.5)).shape[0] == 10
    assert synthetic_outliers(make("dm", digits, outliers="none")) is None


@pytest.mark.parametrize("options,message", [
    (dict(outlier_ratio=0.0), "--outlier-ratio"),
    (dict(outlier_weight=-1.0), "--outlier-weight"),
    (dict(outliers="maybe"), "maybe"),
    (dict(outliers="oe"), "outlier"),
])
def test_bad_outlier_options_are_user_errors(digits, options, message):
    with pytest.raises(FastddError, match=message):
        make("dm", digits, **options)


def test_baseline_is_unchanged_by_the_outlier_code(digits, tmp_path):
    """With outliers off, the run draws nothing extra: the first iteration's images equal a run of the same seed."""
    a = run_distillation(make("dm", digits, outliers="none"), tmp_path / "a", progress=False)
    b = run_distillation(make("dm", digits, outliers="none"), tmp_path / "b", progress=False)
    assert torch.equal(a.images, b.images) and a.outlier_images is None


def test_resume_with_outliers_equals_uninterrupted(digits, tmp_path):
    full = run_distillation(make("dsa", digits, iterations=2), tmp_path / "full", progress=False)
    run_distillation(make("dsa", digits, iterations=1), tmp_path / "part", progress=False)
    resumed = run_distillation(make("dsa", digits, iterations=2), tmp_path / "part", resume=True, progress=False)
    assert torch.equal(resumed.images, full.images)
    assert torch.equal(resumed.outlier_images, full.outlier_images)


# -- the student step with outliers (float64) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2, generator=g).double()
    start = flat_parameters(net).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64)  # 6 labelled + 2 outliers
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 0])
    mask = torch.tensor([False] * 6 + [True] * 2)
    return net, images, labels, mask, start, target


def run(problem, mode, **kwargs):
    net, images, labels, mask, start, target = problem
    kwargs.setdefault("unlabelled", mask)
    if "outlier_weight" in kwargs:
        kwargs["step_loss"] = partial(integrated_loss, weight=kwargs.pop("outlier_weight"))
    g = torch.Generator().manual_seed(3)
    return match_gradients(net, kwargs.pop("images", images), kwargs.pop("labels", labels), start, target,
                           torch.tensor(0.1, dtype=torch.float64), mode=mode, generator=g, **kwargs)


def test_one_student_step_uses_the_integrated_loss(problem):
    net, images, labels, mask, start, target = problem
    images_leaf = images.clone().requires_grad_(True)
    theta = start.clone().requires_grad_(True)
    logits = functional_forward(net, theta, images_leaf)
    loss = F.cross_entropy(logits[:6], labels[:6]) + 0.3 * uniform_cross_entropy(logits[6:]).mean()
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
    theta1 = theta - 0.1 * grad
    matching = ((theta1 - target) ** 2).sum() / ((start - target) ** 2).sum()
    (expected,) = torch.autograd.grad(matching, images_leaf)
    loss_u, grad_u, _ = run(problem, "unrolled", syn_steps=1, outlier_weight=0.3)
    assert torch.allclose(loss_u, matching.detach(), rtol=1e-12)
    assert torch.allclose(grad_u, expected, rtol=1e-10, atol=1e-14)
    assert grad_u[6:].abs().sum() > 0, "the outliers get no gradient"


@pytest.mark.parametrize("batch_syn", [None, 3])
def test_exact_equals_unrolled_with_outliers(problem, batch_syn):
    u = run(problem, "unrolled", syn_steps=4, batch_syn=batch_syn, augment="color_crop_cutout_flip_scale_rotate")
    e = run(problem, "exact", syn_steps=4, batch_syn=batch_syn, augment="color_crop_cutout_flip_scale_rotate")
    assert float((e[1] - u[1]).norm() / u[1].norm()) <= 1e-9
    assert float((e[2] - u[2]).abs() / u[2].abs()) <= 1e-9


def test_zero_weight_outliers_do_not_change_the_labelled_gradient(problem):
    net, images, labels, mask, start, target = problem
    with_outliers = run(problem, "exact", syn_steps=3, outlier_weight=0.0)
    without = run(problem, "exact", syn_steps=3, images=images[:6], labels=labels[:6], unlabelled=None)
    assert torch.allclose(with_outliers[1][:6], without[1], rtol=1e-12, atol=1e-15)
    assert with_outliers[1][6:].abs().max() == 0


def test_bad_unlabelled_rows_are_refused(problem):
    with pytest.raises(ValueError, match="unlabelled"):
        run(problem, "exact", syn_steps=1, unlabelled=torch.zeros(8, dtype=torch.long))


# -- experts ---------------------------------------------------------------------------------------------------------


def test_experts_record_their_outliers(digits, tmp_path):
    base = ExpertConfig(width=WIDTH, num_experts=1, epochs=1)
    poe = ExpertConfig(width=WIDTH, num_experts=1, epochs=1, outliers="poe")
    assert settings_digest(base) != settings_digest(poe)
    train_experts(poe, digits, tmp_path / "poe", progress=False)
    meta = json.loads((tmp_path / "poe" / "experts.json").read_text())
    assert meta["outliers"] == "poe" and meta["settings"]["outliers"] == "poe"
    with pytest.raises(FastddError, match="outliers"):
        load_experts(tmp_path / "poe", expect=expected_metadata(base, digits))
    # A folder written before experts recorded outliers counts as trained without them.
    train_experts(base, digits, tmp_path / "base", progress=False)
    meta = json.loads((tmp_path / "base" / "experts.json").read_text())
    del meta["outliers"]
    (tmp_path / "base" / "experts.json").write_text(json.dumps(meta))
    load_experts(tmp_path / "base", expect=expected_metadata(base, digits))
    with pytest.raises(FastddError, match="outliers"):
        load_experts(tmp_path / "base", expect=expected_metadata(poe, digits))
