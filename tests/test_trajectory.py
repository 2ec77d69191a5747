"""match_gradients: the exact adjoint equals the full unroll; compat equals a stop-gradient unroll (float64)."""

import pytest
import torch
import torch.nn.functional as F

from fastdd.distill.trajectory import match_gradients, plan_student
from fastdd.models import build_model, flat_parameters, functional_forward

N_IMAGES, CLASSES = 6, 3


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=1, num_classes=CLASSES, image_size=8, width=4, depth=2, generator=g)
    net = net.double()
    start = flat_parameters(net).detach().clone()
    target = start + 0.05 * torch.randn(start.shape, generator=g, dtype=torch.float64)
    images = torch.randn(N_IMAGES, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat_interleave(N_IMAGES // CLASSES)
    return net, images, labels, start, target


def run(problem, mode, *, seed=1, **kwargs):
    net, images, labels, start, target = problem
    kwargs.setdefault("syn_steps", 3)
    g = torch.Generator().manual_seed(seed)
    return match_gradients(net, images, labels, start, target, torch.tensor(0.1, dtype=torch.float64),
                           mode=mode, generator=g, **kwargs)


@pytest.mark.parametrize("syn_steps,batch_syn", [(1, None), (3, None), (5, 4), (4, 2)])
def test_exact_equals_unrolled(problem, syn_steps, batch_syn):
    loss_u, img_u, lr_u = run(problem, "unrolled", syn_steps=syn_steps, batch_syn=batch_syn)
    loss_e, img_e, lr_e = run(problem, "exact", syn_steps=syn_steps, batch_syn=batch_syn)
    assert relative_error(loss_e, loss_u) <= 1e-12
    assert relative_error(img_e, img_u) <= 1e-9
    assert relative_error(lr_e, lr_u) <= 1e-9
    assert img_u.abs().sum() > 0 and lr_u.abs() > 0


def test_exact_equals_unrolled_with_augmentation_and_soft_labels(problem):
    net, images, labels, start, target = problem
    soft = torch.softmax(torch.randn(N_IMAGES, CLASSES, generator=torch.Generator().manual_seed(5),
                                     dtype=torch.float64), dim=1)
    soft_problem = (net, images, soft, start, target)
    for strategy in ("color_crop_cutout_flip_scale_rotate",):
        u = run(soft_problem, "unrolled", syn_steps=4, batch_syn=3, augment=strategy)
        e = run(soft_problem, "exact", syn_steps=4, batch_syn=3, augment=strategy)
        assert relative_error(e[1], u[1]) <= 1e-9
        assert relative_error(e[2], u[2]) <= 1e-9


def stop_gradient_unroll(problem, syn_steps, batch_syn, seed=1):
    """theta_{i+1} = theta_i - alpha * g(stop_grad(theta_i), S): TESLA's published gradient."""
    net, images, labels, start, target = problem
    images = images.clone().requires_grad_(True)
    alpha = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    plan = plan_student(N_IMAGES, (8, 8), syn_steps=syn_steps, batch_syn=batch_syn, augment=None,
                        generator=torch.Generator().manual_seed(seed), device=images.device)
    theta = start.clone()
    for idx in plan.batches:
        frozen = theta.detach().requires_grad_(True)
        loss = F.cross_entropy(functional_forward(net, frozen, images[idx]), labels[idx])
        (grad,) = torch.autograd.grad(loss, frozen, create_graph=True)
        theta = theta - alpha * grad
    matching = ((theta - target) ** 2).sum() / ((start - target) ** 2).sum()
    return torch.autograd.grad(matching, (images, alpha))


@pytest.mark.parametrize("syn_steps,batch_syn", [(3, None), (5, 4)])
def test_compat_equals_stop_gradient_unroll(problem, syn_steps, batch_syn):
    _, img_c, lr_c = run(problem, "compat", syn_steps=syn_steps, batch_syn=batch_syn)
    img_s, lr_s = stop_gradient_unroll(problem, syn_steps, batch_syn)
    assert relative_error(img_c, img_s) <= 1e-9
    assert relative_error(lr_c, lr_s) <= 1e-9
    # and it is NOT the exact gradient once there is more than one step
    _, img_e, _ = run(problem, "exact", syn_steps=syn_steps, batch_syn=batch_syn)
    assert relative_error(img_c, img_e) > 1e-6


def test_all_modes_agree_at_one_step(problem):
    results = [run(problem, mode, syn_steps=1, batch_syn=4) for mode in ("unrolled", "exact", "compat")]
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert relative_error(a, b) <= 1e-9


def test_same_generator_same_minibatches():
    a = plan_student(10, (8, 8), syn_steps=7, batch_syn=3, augment="crop", generator=torch.Generator().manual_seed(2),
                     device=torch.device("cpu"))
    b = plan_student(10, (8, 8), syn_steps=7, batch_syn=3, augment="crop", generator=torch.Generator().manual_seed(2),
                     device=torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.batches, b.batches))
    # chunks of fresh permutations: the first ceil(10/3) = 4 batches cover every image once
    assert sorted(torch.cat(a.batches[:4]).tolist()) == list(range(10))


def test_bad_arguments(problem):
    with pytest.raises(ValueError, match="mode"):
        run(problem, "fast")
    with pytest.raises(ValueError, match="syn_steps"):
        run(problem, "exact", syn_steps=0)
    with pytest.raises(ValueError, match="batch_syn"):
        run(problem, "exact", batch_syn=99)


@pytest.mark.parametrize("mode", ["exact", "compat"])
@pytest.mark.parametrize("keep_graphs", [2, 4, 9])
def test_kept_graphs_change_nothing(problem, mode, keep_graphs):
    # Kept graphs replace the reverse pass's recomputation of the same step: the same numbers, with any window
    # (9 > syn_steps keeps every step), also with augmentation and minibatches.
    kwargs = dict(syn_steps=4, batch_syn=3, augment="color_crop_cutout_flip_scale_rotate")
    recomputed = run(problem, mode, **kwargs)
    kept = run(problem, mode, keep_graphs=keep_graphs, **kwargs)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)
    if mode == "exact":
        unrolled = run(problem, "unrolled", **kwargs)
        assert relative_error(kept[1], unrolled[1]) <= 1e-9


def test_kept_graphs_bad_arguments(problem):
    with pytest.raises(ValueError, match="keep_graphs must be at least 1"):
        run(problem, "exact", keep_graphs=0)
    with pytest.raises(ValueError, match="exact and compat"):
        run(problem, "unrolled", keep_graphs=2)
