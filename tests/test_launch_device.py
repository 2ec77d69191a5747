"""Every Triton launch runs under a device guard of its input's device (``--device cuda:1`` in one process)."""

import contextlib
import inspect
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from fastdd.kernels import cluster_cvar as cvar_kernels
from fastdd.kernels import diff_augment as augment_kernels
from fastdd.kernels import instance_norm_relu_pool as norm_kernels
from fastdd.kernels import nearest_synthetic as nearest_kernels
from fastdd.kernels.launch_device import guarded_device, on_input_device
from fastdd.ops import cluster_cvar, diff_augment, instance_norm_relu_pool, nearest_synthetic, sample_augment_params

KERNEL_MODULES = (augment_kernels, cvar_kernels, nearest_kernels, norm_kernels)


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, device the launcher guards, device of the kernel's first tensor argument) of every launch."""
    seen = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        seen.append((self.__name__, guarded_device(), tensor.device))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return seen


def _twice(fn, *inputs):
    """Forward, backward and double backward of ``fn`` w.r.t. ``inputs``."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    upstream = torch.ones_like(out, requires_grad=True)
    grads = torch.autograd.grad(out, inputs, upstream, create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in grads), [*inputs, upstream], allow_unused=True)


def test_every_launch_is_guarded_with_its_inputs_device(launches, generator):
    params = sample_augment_params(2, (6, 7), mode="M", generator=generator)  # every family: all four kernels
    _twice(lambda x: diff_augment(x, params, backend="triton"), torch.randn(2, 3, 6, 7, generator=generator))
    _twice(lambda x, w, b: instance_norm_relu_pool(x, w, b, backend="triton"),
           torch.randn(2, 3, 4, 4, generator=generator), torch.ones(3), torch.zeros(3))
    groups = torch.tensor([0, 1, 0, 1, 1])
    points, centers = torch.randn(5, 4, generator=generator), torch.randn(3, 4, generator=generator)
    nearest_synthetic(points, centers, point_groups=groups, center_groups=torch.tensor([0, 1, 1]), backend="triton")
    losses = torch.randn(5, generator=generator, requires_grad=True)
    cluster_cvar(losses, torch.tensor([0, 1, 0, 1, 2]), 3, 0.5, backend="triton").sum().backward()

    unguarded = [(name, device) for name, guard, device in launches if guard != device]
    assert not unguarded, f"Triton kernels launched without a guard of their input's device: {unguarded}"
    kernels = {name for module in KERNEL_MODULES for name, value in vars(module).items()
               if isinstance(value, InterpretedFunction) and name.endswith("_kernel")}
    assert kernels and kernels <= {name for name, _, _ in launches}, "some kernel was not exercised"


def test_cuda_inputs_make_their_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recording_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", recording_device)
    during = []
    launcher = on_input_device(lambda x, *rest: during.append(guarded_device()))
    launcher(SimpleNamespace(device=torch.device("cuda:1")), 3)
    assert entered == [torch.device("cuda:1")] and during == [torch.device("cuda:1")]
    assert guarded_device() is None


def test_every_public_launcher_is_wrapped():
    for module in KERNEL_MODULES:
        for name, value in vars(module).items():
            if inspect.isfunction(value) and not name.startswith("_") and value.__module__ == module.__name__:
                assert hasattr(value, "__wrapped__"), f"{module.__name__}.{name} launches without a device guard"
