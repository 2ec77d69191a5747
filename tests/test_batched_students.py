"""Batched students: S trajectory-matching students computed as one grouped network equal S separate
``match_gradients`` calls (float64, every mode, with augmentation, soft labels, unlabelled rows, input masks and kept
graphs); the distillers' ``--student-batching grouped`` equals ``sequential``; the option's checks."""

from functools import partial
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config import ConfigError
from fastdd.distill import get_distiller
from fastdd.distill import mtt as mtt_module
from fastdd.distill.batched_students import batched_match_gradients, group_step
from fastdd.distill.trajectory import match_gradients, plan_student
from fastdd.errors import FastddError
from fastdd.models import build_model, flat_parameters, functional_forward
from fastdd.ops import diff_augment, sample_augment_params
from fastdd.ops.augment import cat_augment_params
from fastdd.trust.mdt import mask_sampler
from fastdd.trust.outlier_loss import integrated_loss

from cli_errors import assert_one_sentence_error
from tiny_trajectory import make_distiller

STUDENTS, CLASSES, LABELLED, UNLABELLED = 3, 3, 9, 3
STRATEGY = "color_crop_cutout_flip_scale_rotate"
MODES = ("unrolled", "exact", "compat")
ALPHA = 0.1


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def problem():
    """A width-8, 2-block ConvNet on 8x8 RGB images; three students with their own start and target."""
    g = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=3, num_classes=CLASSES, image_size=8, width=8, depth=2, generator=g).double()
    base = flat_parameters(net).detach()
    starts = torch.stack([base + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64)
                          for _ in range(STUDENTS)])
    targets = starts + 0.05 * torch.randn(starts.shape, generator=g, dtype=torch.float64)
    images = torch.randn(LABELLED + UNLABELLED, 3, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat(LABELLED // CLASSES)
    labels = torch.cat([labels, labels.new_zeros(UNLABELLED)])  # ignored on the unlabelled rows
    unlabelled = torch.arange(LABELLED + UNLABELLED) >= LABELLED
    return SimpleNamespace(net=net, starts=starts, targets=targets, images=images, labels=labels,
                           unlabelled=unlabelled)


def generators():
    return [torch.Generator().manual_seed(10 + s) for s in range(STUDENTS)]


def soft_labels(p):
    """Per student: a callable giving the softmax of its target on the images a step asks for."""
    def of(student):
        def targets(idx):
            with torch.no_grad():
                return torch.softmax(functional_forward(p.net, p.targets[student], p.images[idx]), dim=1)
        return targets
    return [of(s) for s in range(STUDENTS)]


def m_sampler(batch, generator):
    """Every family in strategy order, one transform per image: every student step has the same families."""
    return sample_augment_params(batch, (8, 8), strategy=STRATEGY, mode="M", generator=generator)


def siamese_sampler(batch, generator):
    """One transform shared by the minibatch (batch 1)."""
    return sample_augment_params(1, (8, 8), strategy=STRATEGY, mode="M", generator=generator)


CASES = {
    "full batch": lambda p: {},
    "minibatches": lambda p: dict(batch_syn=4),
    "dsa, one family per student step": lambda p: dict(batch_syn=5, augment=STRATEGY),
    "every family": lambda p: dict(batch_syn=4, augment=m_sampler),
    "siamese": lambda p: dict(batch_syn=4, augment=siamese_sampler),
    "soft labels": lambda p: dict(batch_syn=4, labels=soft_labels(p)),
    "soft label tensor": lambda p: dict(labels=torch.softmax(p.images.flatten(1)[:, :CLASSES] * 3, dim=1)),
    "unlabelled rows": lambda p: dict(batch_syn=5, unlabelled=p.unlabelled,
                                      step_loss=partial(integrated_loss, weight=0.3)),
    "input masks": lambda p: dict(batch_syn=4, input_mask=mask_sampler(0.3, 2, "pixel")),
    "element masks": lambda p: dict(batch_syn=4, input_mask=mask_sampler(0.3, 2, "element")),
    "everything": lambda p: dict(batch_syn=5, augment=STRATEGY, labels=soft_labels(p), unlabelled=p.unlabelled,
                                 step_loss=partial(integrated_loss, weight=0.3),
                                 input_mask=mask_sampler(0.3, 2, "pixel")),
}


def sequential(p, mode, labels=None, syn_steps=4, **kwargs):
    """S calls of match_gradients: ``(losses [S], summed image gradient, summed step-size gradient)``."""
    labels = p.labels if labels is None else labels
    results = [
        match_gradients(p.net, p.images, labels[s] if isinstance(labels, list) else labels, p.starts[s],
                        p.targets[s], ALPHA, syn_steps=syn_steps, mode=mode, generator=g, **kwargs)
        for s, g in enumerate(generators())
    ]
    return torch.stack([r[0] for r in results]), sum(r[1] for r in results), sum(r[2] for r in results)


def batched(p, mode, labels=None, syn_steps=4, **kwargs):
    labels = p.labels if labels is None else labels
    return batched_match_gradients(p.net, p.images, labels, p.starts, p.targets, ALPHA, syn_steps=syn_steps,
                                   mode=mode, generators=generators(), **kwargs)


def assert_same(got, expected, tolerance=1e-12):
    losses, grad_images, grad_lr = got
    assert losses.shape == (STUDENTS,) and grad_images.shape == expected[1].shape
    assert relative_error(losses, expected[0]) <= tolerance
    assert relative_error(grad_images, expected[1]) <= tolerance
    assert relative_error(grad_lr, expected[2]) <= tolerance
    assert expected[1].abs().sum() > 0 and expected[2].abs() > 0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_batched_equals_sequential(problem, mode, case):
    kwargs = CASES[case](problem)
    assert_same(batched(problem, mode, **kwargs), sequential(problem, mode, **kwargs))


@pytest.mark.parametrize("mode", ["exact", "compat"])
@pytest.mark.parametrize("keep_graphs", [2, 9])
def test_kept_graphs(problem, mode, keep_graphs):
    kwargs = CASES["dsa, one family per student step"](problem)
    assert_same(batched(problem, mode, keep_graphs=keep_graphs, **kwargs), sequential(problem, mode, **kwargs))


def test_unlabelled_rows_get_gradients(problem):
    _, grad_images, _ = batched(problem, "exact", **CASES["unlabelled rows"](problem))
    assert grad_images[LABELLED:].abs().sum() > 0


def test_students_with_different_families_are_augmented_by_family(problem):
    # DSA's mode "S" draws one family per student step: some steps group the students in several calls.
    plans = [plan_student(LABELLED, (8, 8), syn_steps=4, batch_syn=3, augment=STRATEGY, generator=g,
                          device=torch.device("cpu")) for g in generators()]
    targets = [[None] * 4 for _ in plans]
    steps = [group_step(plans, targets, i) for i in range(4)]
    assert any(len(step.augment) > 1 for step in steps)
    for step in steps:
        assert sorted(s for students, _ in step.augment for s in students) == list(range(STUDENTS))
        assert step.idx.shape == (STUDENTS * 3,)


def test_bf16_close_to_sequential():
    # The precision argument: the students' forward passes run under autocast, the rest in the images' dtype.
    g = torch.Generator().manual_seed(1)
    net = build_model("convnet", channels=3, num_classes=CLASSES, image_size=8, width=8, depth=2, norm="none",
                      generator=g)
    base = flat_parameters(net).detach()
    starts = torch.stack([base + 0.05 * torch.randn(base.shape, generator=g) for _ in range(STUDENTS)])
    p = SimpleNamespace(net=net, starts=starts, targets=starts + 0.05 * torch.randn(starts.shape, generator=g),
                        images=torch.randn(LABELLED, 3, 8, 8, generator=g), labels=torch.arange(CLASSES).repeat(3))
    for mode in MODES:
        got = batched(p, mode, batch_syn=4, precision="bf16")
        expected = sequential(p, mode, batch_syn=4, precision="bf16")
        fp32 = batched(p, mode, batch_syn=4)
        assert got[1].dtype == got[2].dtype == got[0].dtype == torch.float32
        assert not torch.equal(got[1], fp32[1])  # autocast really ran
        assert relative_error(got[1], expected[1]) < 0.05 and relative_error(got[0], expected[0]) < 0.01
        assert relative_error(got[1], fp32[1]) < 0.1


def test_cat_augment_params_equals_separate_calls(generator):
    xs = [torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64) for n in (2, 3, 1)]
    params = [sample_augment_params(1 if n == 3 else n, (8, 8), strategy=STRATEGY, mode="M", generator=generator)
              for n in (2, 3, 1)]
    joined = cat_augment_params(params, [2, 3, 1])
    assert joined.batch == 6
    expected = torch.cat([diff_augment(x, p) for x, p in zip(xs, params)])
    torch.testing.assert_close(diff_augment(torch.cat(xs), joined), expected, rtol=0, atol=1e-14)
    crop = sample_augment_params(2, (8, 8), strategy="crop", generator=generator)
    with pytest.raises(ValueError, match="same families"):
        cat_augment_params([params[0], crop], [2, 2])
    with pytest.raises(ValueError, match="cannot apply to 4 images"):
        cat_augment_params([params[0]], [4])


def test_bad_arguments(problem, generator):
    p = problem
    with pytest.raises(ValueError, match=r"must be \[3, "):
        batched_match_gradients(p.net, p.images, p.labels, p.starts[:2], p.targets, ALPHA, syn_steps=2,
                                generators=generators())
    with pytest.raises(ValueError, match="labels holds 2 targets"):
        batched(p, "exact", labels=soft_labels(p)[:2])
    with pytest.raises(ValueError, match="mode"):
        batched(p, "fast")
    with pytest.raises(ValueError, match="keep_graphs"):
        batched(p, "unrolled", keep_graphs=2)
    batchnorm = build_model("convnet", channels=3, num_classes=CLASSES, image_size=8, width=8, depth=2,
                            norm="batchnorm", generator=generator).double()
    with pytest.raises(ValueError, match="instancenorm"):
        batched_match_gradients(batchnorm, p.images, p.labels, p.starts, p.targets, ALPHA, syn_steps=2,
                                generators=generators())


# -- the distillers ---------------------------------------------------------------------------------------------------


def make(method, digits, experts, **overrides):
    return make_distiller(method, digits, experts, **{"students": 3, **overrides})


def one_iteration(method, digits, experts, tmp_path, **overrides):
    """The images and step size after one iteration, computed in float64."""
    distiller = make(method, digits, experts, **overrides)
    distiller.prepare(tmp_path, progress=False)
    distiller.images.data = distiller.images.data.double()
    distiller.syn_lr.data = distiller.syn_lr.data.double()
    distiller.net.double()
    start = distiller.images.detach().clone()
    loss = distiller.step(0)["loss"]
    return start, distiller.images.detach(), distiller.syn_lr.detach(), loss


@pytest.mark.parametrize("method,overrides", [
    ("mtt", {}),
    ("tesla", {"batch_syn": 7, "soft_labels": True}),
    ("tesla-compat", {"keep_graphs": 2}),
])
def test_grouped_step_equals_sequential(digits, experts, tmp_path, method, overrides):
    start, seq_images, seq_lr, seq_loss = one_iteration(method, digits, experts, tmp_path,
                                                        student_batching="sequential", **overrides)
    _, grp_images, grp_lr, grp_loss = one_iteration(method, digits, experts, tmp_path, student_batching="grouped",
                                                    **overrides)
    moved = (seq_images - start).norm()
    assert moved > 0
    assert float((grp_images - seq_images).norm() / moved) <= 1e-10
    assert abs(float(grp_lr - seq_lr)) <= 1e-12 * abs(float(seq_lr))
    assert grp_loss == pytest.approx(seq_loss, rel=1e-12)


def test_grouped_calls_the_batched_path(digits, experts, tmp_path, monkeypatch):
    calls = []
    real = mtt_module.batched_match_gradients

    def spy(*args, **kwargs):
        calls.append(len(kwargs["generators"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(mtt_module, "batched_match_gradients", spy)
    distiller = make("tesla", digits, experts, student_batching="grouped")
    distiller.prepare(tmp_path, progress=False)
    distiller.step(0)
    assert calls == [3]


def test_auto_is_sequential_on_the_cpu_and_grouped_on_cuda(digits, experts, monkeypatch):
    distiller = make("tesla", digits, experts)
    assert distiller.config.student_batching == "auto"
    assert distiller.student_batching() == "sequential"
    distiller.device = torch.device("cuda")  # only the choice is asked: nothing runs there
    assert distiller.student_batching() == "grouped"
    assert make("tesla", digits, experts, students=1).student_batching() == "sequential"
    batchnorm = make("tesla", digits, experts, norm="batchnorm")
    batchnorm.device = torch.device("cuda")
    assert batchnorm.student_batching() == "sequential"
    monkeypatch.setattr(mtt_module.distributed, "world_size", lambda: 4)  # rows split: 3 students, 4 processes
    assert distiller.student_batching() == "sequential"
    assert make("tesla", digits, experts, student_batching="sequential").student_batching() == "sequential"


def test_grouped_refuses_row_splitting(digits, experts, monkeypatch):
    distiller = make("tesla", digits, experts, students=1, student_batching="grouped")
    monkeypatch.setattr(mtt_module.distributed, "world_size", lambda: 2)
    with pytest.raises(FastddError, match="--student-batching grouped does not combine with splitting"):
        distiller.step(0)


# -- the option -------------------------------------------------------------------------------------------------------


def test_option_is_checked_and_recorded_only_off_its_default():
    tesla = get_distiller("tesla").config_class
    assert "student_batching" not in tesla.from_options({}, method="tesla").to_dict()
    grouped = tesla.from_options({"student_batching": "grouped"}, method="tesla")
    assert grouped.to_dict()["student_batching"] == "grouped"
    assert tesla.from_options({"student_batching": "Sequential"}, method="tesla").student_batching == "sequential"
    with pytest.raises(ConfigError, match="--student-batching grouped runs the students as one grouped-convolution"):
        tesla.from_options({"student_batching": "grouped", "norm": "batchnorm"}, method="tesla")
    with pytest.raises(ConfigError, match="not --model vgg11"):
        tesla.from_options({"student_batching": "grouped", "model": "vgg11"}, method="tesla")
    with pytest.raises(ConfigError, match="must be one of auto, grouped, sequential"):
        tesla.from_options({"student_batching": "parallel"}, method="tesla")
    assert tesla.from_options({"student_batching": "grouped", "norm": "none"}, method="tesla")
    # batchnorm is fine for the other choices
    assert tesla.from_options({"norm": "batchnorm"}, method="tesla").student_batching == "auto"


def test_cli_refuses_grouped_batchnorm_in_one_sentence(tmp_path):
    result = CliRunner().invoke(app, ["distill", "--method", "tesla", "--student-batching", "grouped", "--norm",
                                      "batchnorm", "--out", str(tmp_path / "o"), "--quiet"])
    assert_one_sentence_error(result, "--student-batching grouped", "--norm batchnorm", "sequential or auto")
    other = CliRunner().invoke(app, ["distill", "--method", "dm", "--student-batching", "grouped", "--out",
                                     str(tmp_path / "o"), "--quiet"])
    assert_one_sentence_error(other, "--student-batching")
