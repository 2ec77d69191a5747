"""Batched students: S ConvNet students as one grouped network equal S separate students, to second order."""

import pytest
import torch
import torch.nn.functional as F

from fastdd.models import build_model
from fastdd.models.batched import batched_functional_forward
from fastdd.models.functional import flat_parameters, functional_forward

STUDENTS = 3


def _students(generator, *, norm="instancenorm", pooling="avgpool", image_size=(9, 10)):
    net = build_model(
        "convnet", channels=3, num_classes=5, image_size=image_size, width=6, depth=2, norm=norm, pooling=pooling,
        generator=generator,
    ).double()
    base = flat_parameters(net).detach()
    thetas = torch.stack([base + 0.1 * torch.randn(base.shape, generator=generator, dtype=base.dtype)
                          for _ in range(STUDENTS)])
    images = torch.randn(STUDENTS, 4, 3, *image_size, generator=generator, dtype=torch.float64)
    return net, thetas, images


def _sequential(net, thetas, images):
    return torch.stack([functional_forward(net, thetas[s], images[s]) for s in range(len(thetas))])


@pytest.mark.parametrize("norm", ["instancenorm", "none"])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool", "none"])
def test_logits_equal_separate_students(norm, pooling, generator):
    net, thetas, images = _students(generator, norm=norm, pooling=pooling)
    torch.testing.assert_close(
        batched_functional_forward(net, thetas, images), _sequential(net, thetas, images), atol=1e-12, rtol=1e-10
    )


def test_student_step_quantities_equal_separate_students(generator):
    """The step gradient of every student, and the image gradient and Hessian-vector product of <gradient, lam>:
    what a tesla reverse step takes from each student."""
    net, thetas, images = _students(generator, image_size=(8, 8))
    labels = torch.randint(0, 5, images.shape[:2], generator=generator)
    lam = torch.randn(thetas.shape, generator=generator, dtype=thetas.dtype)

    def quantities(forward):
        theta = thetas.clone().requires_grad_(True)
        x = images.clone().requires_grad_(True)
        loss = F.cross_entropy(forward(net, theta, x).flatten(0, 1), labels.flatten(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return (grad.detach(), *torch.autograd.grad((grad * lam).sum(), (x, theta)))

    for got, expected in zip(quantities(batched_functional_forward), quantities(_sequential)):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-9)


def test_bad_input(generator):
    net, thetas, images = _students(generator)
    with pytest.raises(ValueError, match=r"flat_params must be \[S, "):
        batched_functional_forward(net, thetas[:, :-1], images)
    with pytest.raises(ValueError, match=r"x must be \[3, B, 3, 9, 10\]"):
        batched_functional_forward(net, thetas, images[:2])
    batchnorm = build_model("convnet", channels=3, num_classes=5, image_size=(9, 10), width=6, depth=2,
                            norm="batchnorm", generator=generator)
    with pytest.raises(ValueError, match="instancenorm"):
        batched_functional_forward(batchnorm, thetas.float(), images.float())
