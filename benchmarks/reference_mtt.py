"""One MTT distillation step written the way the MTT reference code does it: the benchmarks' baseline.

The reference code (Cazenavette et al., ``distill.py``) keeps a Python list of flat student parameter vectors,
runs the student as an ``nn.Module`` whose parameters are views of the current vector, augments each minibatch
with DSA written as a chain of PyTorch ops, takes every step with ``torch.autograd.grad(..., create_graph=True)``
so the whole unroll stays in the autograd graph, and backpropagates the normalised parameter distance through it.
``reference_mtt_gradients`` does exactly that work on fastdd's ConvNet: its blocks run as their ``nn.Sequential``
modules (GroupNorm, ReLU, AvgPool2d: no fused epilogue) and the augmentation is ``fastdd.ops``' pure-PyTorch
reference. It draws the same minibatches and augmentation parameters as ``fastdd.distill.trajectory``, so its
gradients equal fastdd's ``unrolled`` and ``exact`` modes and the benchmarks can check that they do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fastdd.distill.trajectory import plan_student
from fastdd.models.functional import parameter_layout
from fastdd.ops._augment_reference import augment_reference


def _module_forward(net, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The ConvNet as its modules, with parameters that are views of ``flat`` (the reference's ReparamModule)."""
    params = parameter_layout(net).unflatten(flat)
    features = {name.removeprefix("features."): p for name, p in params.items() if name.startswith("features.")}
    embedding = functional_call(net.features, features, (x,)).flatten(1)
    return F.linear(embedding, params["classifier.weight"], params["classifier.bias"])


def reference_mtt_gradients(net, images, labels, start_params, target_params, syn_lr, *, syn_steps, augment,
                            generator, batch_syn=None):
    """``(loss, grad_images [n, C, H, W], grad_lr)`` of one MTT step, unrolled through all ``syn_steps`` steps.

    Arguments as ``fastdd.distill.trajectory.match_gradients`` (labels [n] int64, augment a DSA strategy or None).
    """
    images = images.detach().requires_grad_(True)
    syn_lr = torch.as_tensor(syn_lr, dtype=images.dtype).clone().requires_grad_(True)
    plan = plan_student(
        images.shape[0], tuple(images.shape[-2:]), syn_steps=syn_steps, batch_syn=batch_syn, augment=augment,
        generator=generator, device=images.device,
    )
    student_params = [start_params.detach().clone().requires_grad_(True)]
    for idx, params in zip(plan.batches, plan.augment):
        x = images[idx]
        if params is not None:
            x = augment_reference(x, params)
        ce_loss = F.cross_entropy(_module_forward(net, student_params[-1], x), labels[idx])
        (grad,) = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)
        student_params.append(student_params[-1] - syn_lr * grad)
    num_params = start_params.numel()
    param_loss = F.mse_loss(student_params[-1], target_params, reduction="sum") / num_params
    param_dist = F.mse_loss(start_params, target_params, reduction="sum") / num_params
    loss = param_loss / param_dist
    grad_images, grad_lr = torch.autograd.grad(loss, (images, syn_lr))
    return loss.detach(), grad_images, grad_lr
