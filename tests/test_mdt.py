"""MDT (masked distillation training): where the mask acts in each distiller, the student plan's masks, exactness of
the masked adjoint, no change without MDT, refusal for dm, the CLI options and their record in synset.json."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, match_gradients, run_distillation
from fastdd.distill.experts import ExpertConfig, train_experts
from fastdd.distill.draws import draw_generator
from fastdd.distill.trajectory import plan_student
from fastdd.errors import FastddError
from fastdd.models import build_model, flat_parameters, functional_forward
from fastdd.ops import diff_augment
from fastdd.trust.masking import DEFAULT_MASK_RATIO, mask_like
from fastdd.trust.mdt import mask_sampler

WIDTH = 8
STRATEGY = "color_crop_cutout_flip_scale_rotate"
DC_TINY = dict(ipc=1, iterations=2, width=WIDTH, batch_real=8, outer_loop=2, inner_loop=1)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def experts(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("experts")
    train_experts(ExpertConfig(width=WIDTH, num_experts=1, epochs=2), digits, folder, progress=False)
    return folder


def make(method, digits, experts=None, **overrides):
    if method in ("mtt", "tesla", "tesla-compat"):
        options = dict(ipc=1, iterations=2, width=WIDTH, syn_steps=2, expert_epochs=1, max_start_epoch=1,
                       lr_img=10.0, lr_lr=1e-5, experts=str(experts))
    else:
        options = dict(DC_TINY)
    options.update(overrides)
    cls = get_distiller(method)
    return cls(cls.config_class.from_options(options, method=method), digits)


# -- the student plan and the masked adjoint (float64) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2, generator=g).double()
    start = flat_parameters(net).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(2)
    return net, images, labels, start, target


def run(problem, mode, **kwargs):
    net, images, labels, start, target = problem
    g = torch.Generator().manual_seed(1)
    return match_gradients(net, images, labels, start, target, torch.tensor(0.1, dtype=torch.float64), mode=mode,
                           generator=g, **kwargs)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_plan_masks_have_the_exact_count_and_change_every_step():
    plan = plan_student(10, (8, 8), syn_steps=5, batch_syn=4, augment="crop", input_mask=mask_sampler(0.25),
                        generator=torch.Generator().manual_seed(2), device=torch.device("cpu"))
    assert len(plan.masks) == 5
    for idx, mask in zip(plan.batches, plan.masks):
        assert mask.shape == (idx.numel(), 1, 8, 8)
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert ((mask == 0).sum(dim=(1, 2, 3)) == 16).all()  # round(0.25 * 64) per image
    assert not torch.equal(plan.masks[0], plan.masks[1][: plan.masks[0].shape[0]])
    again = plan_student(10, (8, 8), syn_steps=5, batch_syn=4, augment="crop", input_mask=mask_sampler(0.25),
                         generator=torch.Generator().manual_seed(2), device=torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(plan.masks, again.masks))
    plain = plan_student(10, (8, 8), syn_steps=5, batch_syn=4, augment="crop",
                         generator=torch.Generator().manual_seed(2), device=torch.device("cpu"))
    assert plain.masks == [None] * 5


@pytest.mark.parametrize("syn_steps,batch_syn,unit", [(3, None, "pixel"), (4, 3, "pixel"), (3, 2, "element")])
def test_exact_equals_unrolled_with_masks(problem, syn_steps, batch_syn, unit):
    options = dict(syn_steps=syn_steps, batch_syn=batch_syn, augment=STRATEGY, input_mask=mask_sampler(0.3, unit=unit))
    loss_u, img_u, lr_u = run(problem, "unrolled", **options)
    loss_e, img_e, lr_e = run(problem, "exact", **options)
    assert relative_error(loss_e, loss_u) <= 1e-12
    assert relative_error(img_e, img_u) <= 1e-9
    assert relative_error(lr_e, lr_u) <= 1e-9
    unmasked = run(problem, "exact", syn_steps=syn_steps, batch_syn=batch_syn, augment=STRATEGY)
    assert relative_error(img_e, unmasked[1]) > 1e-3


def test_compat_with_masks_equals_a_masked_stop_gradient_unroll(problem):
    net, images, labels, start, target = problem
    _, img_c, lr_c = run(problem, "compat", syn_steps=3, batch_syn=4, augment=STRATEGY, input_mask=mask_sampler(0.3))
    plan = plan_student(6, (8, 8), syn_steps=3, batch_syn=4, augment=STRATEGY, input_mask=mask_sampler(0.3),
                        generator=torch.Generator().manual_seed(1), device=images.device)
    leaf = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    theta = start.clone()
    for idx, params, mask in zip(plan.batches, plan.augment, plan.masks):
        frozen = theta.detach().requires_grad_(True)
        x = diff_augment(leaf[idx], params) * mask.double()
        (grad,) = torch.autograd.grad(F.cross_entropy(functional_forward(net, frozen, x), labels[idx]), frozen,
                                      create_graph=True)
        theta = theta - alpha * grad
    matching = ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()
    img_s, lr_s = torch.autograd.grad(matching, (leaf, alpha))
    assert relative_error(img_c, img_s) <= 1e-9
    assert relative_error(lr_c, lr_s) <= 1e-9


# -- the distillers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dc", "tesla"])
def test_ratio_zero_equals_no_mdt_and_a_positive_ratio_changes_the_set(method, digits, experts, tmp_path):
    off = run_distillation(make(method, digits, experts), tmp_path / "off", progress=False)
    zero = run_distillation(make(method, digits, experts, mdt=True, mask_ratio=0.0), tmp_path / "zero",
                            progress=False)
    on = run_distillation(make(method, digits, experts, mdt=True, mask_ratio=0.5), tmp_path / "on", progress=False)
    assert torch.equal(zero.images, off.images)
    assert torch.isfinite(on.images).all() and not torch.equal(on.images, off.images)
    assert on.meta["hyperparameters"]["mdt"] is True and on.meta["hyperparameters"]["mask_ratio"] == 0.5
    assert "mdt" not in off.meta["hyperparameters"] and "mask_ratio" not in off.meta["hyperparameters"]


def test_dc_matches_the_masked_synthetic_gradient_against_the_unmasked_real_one(digits):
    """Class 0's image gradient equals a hand computation: mse between the gradient of CE on the masked synthetic
    image and the gradient of CE on the real batch (unmasked), with the draws made again from their positions."""
    distiller = make("dc", digits, dis_metric="mse", mdt=True, mask_ratio=0.5, outer_loop=1)
    net = distiller.new_network(torch.Generator().manual_seed(0))
    distiller._match_classes(net, 3, 0)
    got = distiller.images.grad[0:1].clone()

    params = list(net.parameters())
    idx = distiller.class_index.sample(0, 8, draw_generator(0, "real", 3, 0, 0))
    real = digits.train_images[idx]
    mask = mask_like((1, 1, 8, 8), 0.5, generator=draw_generator(0, "mask", 3, 0, 0))
    assert int((mask == 0).sum()) == 32
    syn = distiller.images[0:1].detach().clone().requires_grad_(True)
    target = torch.zeros(8, dtype=torch.long)
    g_real = torch.autograd.grad(F.cross_entropy(net(real), target), params)
    g_syn = torch.autograd.grad(F.cross_entropy(net(syn * mask), target[:1]), params, create_graph=True)
    distance = sum(((a - b.detach()) ** 2).sum() for a, b in zip(g_syn, g_real))
    (expected,) = torch.autograd.grad(distance, syn)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert (expected.flatten()[mask.flatten() == 0] == 0).all(), "masked pixels must get no gradient"

    plain = make("dc", digits, dis_metric="mse", outer_loop=1)
    plain._match_classes(plain.new_network(torch.Generator().manual_seed(0)), 3, 0)
    assert not torch.allclose(plain.images.grad[0:1], got)


def test_dc_inner_loop_trains_on_masked_synthetic_minibatches(digits):
    distiller = make("dc", digits, mdt=True, mask_ratio=0.5, batch_train=4)
    net = distiller.new_network(torch.Generator().manual_seed(0))
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    distiller._train_on_synthetic(net, torch.optim.SGD(net.parameters(), lr=0.01), 0, 0)
    assert len(seen) == 3  # ten images in minibatches of four
    for x in seen:
        assert ((x == 0).all(dim=1).sum(dim=(1, 2)) >= 32).all()  # 32 of 64 pixels zero in every channel


def test_resume_with_mdt_equals_uninterrupted(digits, tmp_path):
    full = run_distillation(make("dsa", digits, mdt=True), tmp_path / "full", progress=False)
    run_distillation(make("dsa", digits, mdt=True, iterations=1), tmp_path / "part", progress=False)
    resumed = run_distillation(make("dsa", digits, mdt=True), tmp_path / "part", resume=True, progress=False)
    assert torch.equal(resumed.images, full.images)


def test_settings_record_mdt_only_when_on(digits):
    cls = get_distiller("dsa").config_class
    assert "mdt" not in cls().to_dict() and "mask_ratio" not in cls().to_dict()
    assert cls(mdt=True).to_dict()["mask_ratio"] == DEFAULT_MASK_RATIO
    # The mask unit only when it is not the default, so MDT runs from before the option still resume.
    assert "mask_unit" not in cls(mdt=True).to_dict() and "mask_unit" not in cls(mask_unit="element").to_dict()
    assert cls(mdt=True, mask_unit="element").to_dict()["mask_unit"] == "element"


def test_element_masks_in_the_student_plan_are_per_channel():
    plan = plan_student(10, (8, 8), syn_steps=3, batch_syn=4, augment=None,
                        input_mask=mask_sampler(0.5, unit="element"), generator=torch.Generator().manual_seed(2),
                        device=torch.device("cpu"), channels=3)
    assert [m.shape for m in plan.masks] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert not torch.equal(plan.masks[0][:, 0], plan.masks[0][:, 1])


@pytest.mark.parametrize("net_data", [None, "real"])
def test_dm_refuses_mdt(digits, net_data):
    with pytest.raises(FastddError, match="--mdt does not apply to dm"):
        get_distiller("dm")(get_distiller("dm").config_class(ipc=1, mdt=True, net_data=net_data), digits)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_bad_mask_ratio(digits, ratio):
    with pytest.raises(FastddError, match="--mask-ratio"):
        make("dc", digits, mdt=True, mask_ratio=ratio)


# -- command line -----------------------------------------------------------------------------------------------------

runner = CliRunner()
CLI_TINY = ["--ipc", "1", "--width", "8", "--batch-real", "8", "--iterations", "1", "--quiet"]
CLI_DC = ["--method", "dc", "--outer-loop", "2", "--inner-loop", "1", *CLI_TINY]


def test_cli_distill_with_mdt_records_it(tmp_path):
    result = runner.invoke(app, ["distill", *CLI_DC, "--mdt", "--mask-ratio", "0.25", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    hyper = json.loads((tmp_path / "synset.json").read_text())["hyperparameters"]
    assert hyper["mdt"] is True and hyper["mask_ratio"] == 0.25
    element = tmp_path / "element"
    result = runner.invoke(app, ["distill", *CLI_DC, "--mdt", "--mask-unit", "element", "--out", str(element)])
    assert result.exit_code == 0, result.output
    assert json.loads((element / "synset.json").read_text())["hyperparameters"]["mask_unit"] == "element"


@pytest.mark.parametrize("args,fragment", [
    (["--method", "dc", "--mask-ratio", "0.2"], "--mdt"),
    (["--method", "dc", "--mask-unit", "element"], "--mdt"),
    (["--method", "dm", "--mdt"], "does not apply to dm"),
])
def test_cli_refusals_are_one_sentence(tmp_path, args, fragment):
    result = runner.invoke(app, ["distill", *CLI_TINY, *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr


def test_cli_help_states_the_default_ratio():
    result = runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "400"})
    assert f"(default: {DEFAULT_MASK_RATIO})" in " ".join(result.output.split())
