"""Cluster CVaR: the group-robust loss of distillation, the mean of the worst losses inside every cluster.

``cluster_cvar(losses, assign, num_clusters, alpha)`` returns, for every cluster ``g``, the mean of the
``k_g = ceil(alpha * n_g)`` largest losses among its ``n_g`` members (0 for an empty cluster): the upper-tail CVaR at
level ``alpha``. Its gradient is ``1 / k_g`` on the selected losses and 0 elsewhere. Among equal losses the lower
sample index is selected first, and a NaN loss counts as the largest, so it reaches the result instead of hiding.
``group_cvar_loss`` adds the mean and the max of the CVaRs of the non-empty clusters.

Backends:
  ``"reference"``  pure PyTorch (a loop over clusters with a stable sort); the test oracle and the fallback.
  ``"cpp"``        ``torch.ops.fastdd.cluster_cvar``: counting sort by cluster, then a selection per cluster.
  ``"triton"``     ``fastdd.kernels.cluster_cvar``: samples sorted by cluster, each sample ranked inside its segment
                   (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
  ``"auto"``       CUDA tensor: triton, else reference. CPU tensor: cpp, else reference.

All backends select the same samples; they return ``(cvar, weight)`` internally, where ``weight[i]`` is ``1 / k_g``
for a selected sample and 0 otherwise, so the backward is one gather and a product.

dtypes: losses may be float32, float64, bfloat16 or float16; the CVaRs and the gradient come in the losses' dtype.
Half-precision losses are compared as they are (the selection needs no wider type) and summed in float32.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from fastdd import _extension
from fastdd.ops._dispatch import choose_backend, compute_dtype, triton_module, unavailable_reason

# alpha * n that is an integer up to rounding (0.7 * 10 = 7.000000000000001) counts as that integer.
_TAIL_TOLERANCE = 1e-9


def tail_size(count: int, alpha: float) -> int:
    """``ceil(alpha * count)``, at least 1 and at most ``count``: how many of ``count`` losses the CVaR averages."""
    return min(count, max(1, math.ceil(alpha * count - _TAIL_TOLERANCE)))


def cluster_cvar(
    losses: Tensor, assign: Tensor, num_clusters: int, alpha: float = 0.8, *, backend: str = "auto"
) -> Tensor:
    """Upper-tail CVaR of the losses of every cluster.

    Args:
        losses: [N] float32, float64, bfloat16 or float16 per-sample losses (differentiable).
        assign: [N] int64 cluster of every sample, in ``[0, num_clusters)``, on the device of ``losses``.
        num_clusters: G >= 1 (clusters without members get 0).
        alpha: tail level in (0, 1]: each cluster averages its ``ceil(alpha * n_g)`` largest losses.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see the module docstring).

    Returns:
        [G] tensor in the dtype of ``losses``; ``d cvar[g] / d losses[i] = 1 / k_g`` for the selected ``i`` of
        cluster ``g``, else 0.

    Raises:
        TypeError: ``losses`` is not floating point or ``assign`` is not int64.
        ValueError: bad shapes, devices, ``num_clusters``, ``alpha``, an ``assign`` value out of range, or an
            unknown backend.
        RuntimeError: the requested backend cannot run these inputs here (the message says why).
    """
    _check_inputs(losses, assign, num_clusters, alpha)
    chosen = resolve_backend(backend, losses)
    if chosen == "reference":
        return cluster_cvar_reference(losses, assign, num_clusters, alpha)
    if chosen == "cpp":
        cvar, _ = torch.ops.fastdd.cluster_cvar(losses, assign, num_clusters, float(alpha))
        return cvar
    return _TritonClusterCVaR.apply(losses, assign, num_clusters, float(alpha))


def group_cvar_loss(
    losses: Tensor, assign: Tensor, num_clusters: int, alpha: float = 0.8, *, backend: str = "auto"
) -> Tensor:
    """Mean plus max of the cluster CVaRs over the non-empty clusters: a 0-d tensor (0 when N = 0).

    Args and Raises as :func:`cluster_cvar`; the distillers add this to the mean loss of the network update.
    """
    cvar = cluster_cvar(losses, assign, num_clusters, alpha, backend=backend)
    occupied = torch.bincount(assign, minlength=num_clusters) > 0
    # Masked instead of indexed, with no branch on the data: no host sync on a GPU.
    count = occupied.sum()
    mean = torch.where(occupied, cvar, 0).sum() / count.clamp(min=1)
    worst = torch.where(occupied, cvar, float("-inf")).max()
    return torch.where(count > 0, mean + worst, losses.sum() * 0)


def cluster_cvar_reference(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> Tensor:
    """Pure-PyTorch ``cluster_cvar``: losses [N], assign [N] int64 -> [G] in the losses' dtype, written for clarity
    (a loop over clusters; the means of half-precision losses are taken in float32)."""
    compute = compute_dtype(losses.dtype)
    values = []
    for g in range(num_clusters):
        worst = _worst_members(losses, assign, g, alpha)
        values.append(losses.new_zeros((), dtype=compute) if worst is None else losses[worst].to(compute).mean())
    return torch.stack(values).to(losses.dtype)


def cluster_cvar_weight_reference(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> Tensor:
    """[N] weights of the reference selection: ``1 / k_g`` for a selected sample, else 0 (the gradient of cvar)."""
    weight = torch.zeros_like(losses)
    for g in range(num_clusters):
        worst = _worst_members(losses, assign, g, alpha)
        if worst is not None:
            weight[worst] = 1.0 / worst.numel()
    return weight


def _worst_members(losses: Tensor, assign: Tensor, cluster: int, alpha: float) -> Tensor | None:
    """Indices (increasing) of the ``tail_size`` worst members of ``cluster``, or None when it has no members.

    The members, in increasing index order, are sorted by loss, largest first, with a stable sort: equal losses keep
    the lower index first, and NaN, which ``torch.sort`` places above every number, comes first.
    """
    members = (assign == cluster).nonzero().squeeze(1)
    if members.numel() == 0:
        return None
    k = tail_size(members.numel(), alpha)
    order = torch.sort(losses[members].detach(), descending=True, stable=True).indices[:k]
    return members[order.sort().values]


def resolve_backend(backend: str, losses: Tensor) -> str:
    """The backend ``cluster_cvar`` runs for ``losses``: ``backend`` itself, or auto's choice.

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that cannot run here.
    """
    return choose_backend("cluster_cvar", backend, losses, triton_kernel="cluster_cvar", cuda_kernel=False)


def _check_inputs(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> None:
    if not isinstance(losses, Tensor) or not isinstance(assign, Tensor):
        raise TypeError(
            f"cluster_cvar expects tensors, got losses of type {type(losses).__name__} and assign of type "
            f"{type(assign).__name__}"
        )
    shapes = f"losses {tuple(losses.shape)} and assign {tuple(assign.shape)}"
    if losses.dim() != 1 or assign.shape != losses.shape:
        raise ValueError(f"cluster_cvar expects losses [N] and assign [N], got {shapes}")
    if not losses.is_floating_point():
        raise TypeError(f"cluster_cvar expects floating-point losses, got {losses.dtype}")
    if assign.dtype != torch.int64:
        raise TypeError(f"cluster_cvar expects int64 cluster assignments, got {assign.dtype}")
    if assign.device != losses.device:
        raise ValueError(f"cluster_cvar expects one device, got {losses.device} and {assign.device} ({shapes})")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"cluster_cvar expects num_clusters to be an int >= 1, got {num_clusters!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
        raise ValueError(f"cluster_cvar expects alpha in (0, 1], got {alpha!r}")
    if not assign.numel():
        return
    if assign.device.type != "cpu":  # checked on the device, raised at the next sync: no host sync per call
        in_range = ((assign >= 0) & (assign < num_clusters)).all()
        torch._assert_async(in_range, f"cluster_cvar expects assign values in [0, {num_clusters})")
    elif int(assign.min()) < 0 or int(assign.max()) >= num_clusters:
        raise ValueError(
            f"cluster_cvar expects assign values in [0, {num_clusters}), got values from {int(assign.min())} to "
            f"{int(assign.max())}"
        )


def _unavailable_reason(backend: str, losses: Tensor) -> str | None:
    """Why ``backend`` cannot run ``cluster_cvar`` on tensors like ``losses``, or None when it can."""
    return unavailable_reason(backend, losses, triton_kernel="cluster_cvar", cuda_kernel=False)


def _triton_kernels() -> tuple[ModuleType | None, str | None]:
    return triton_module("cluster_cvar")


def _backward(grad_cvar: Tensor, assign: Tensor, weight: Tensor) -> Tensor:
    return grad_cvar.index_select(0, assign) * weight


class _TritonClusterCVaR(torch.autograd.Function):
    """Triton selection (the weights); the sum per cluster and the backward are PyTorch gathers and scatters."""

    @staticmethod
    def forward(ctx, losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> Tensor:
        module, _ = _triton_kernels()
        weight = module.cluster_cvar_weight(losses, assign, num_clusters, alpha)
        ctx.save_for_backward(assign, weight)
        compute = compute_dtype(losses.dtype)  # half-precision losses are summed in float32
        return torch.zeros(num_clusters, dtype=compute, device=losses.device).index_add_(
            0, assign, losses.to(compute) * weight.to(compute)
        ).to(losses.dtype)

    @staticmethod
    def backward(ctx, grad_cvar: Tensor) -> tuple[Tensor, None, None, None]:
        assign, weight = ctx.saved_tensors
        return _backward(grad_cvar, assign, weight), None, None, None


def _register_compiled_op() -> None:
    """Fake (shape-only) implementation and the autograd formula of ``torch.ops.fastdd.cluster_cvar``."""

    @torch.library.register_fake("fastdd::cluster_cvar")
    def _cluster_cvar_fake(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> tuple[Tensor, Tensor]:
        torch._check(losses.dim() == 1, lambda: "losses must be 1-D")
        return losses.new_empty(num_clusters), torch.empty_like(losses)

    def setup_context(ctx, inputs, output) -> None:
        _, assign, _, _ = inputs
        _, weight = output
        ctx.save_for_backward(assign, weight)
        ctx.mark_non_differentiable(weight)

    def backward(ctx, grad_cvar: Tensor, grad_weight: Tensor | None):
        assign, weight = ctx.saved_tensors
        return _backward(grad_cvar, assign, weight), None, None, None

    torch.library.register_autograd("fastdd::cluster_cvar", backward, setup_context=setup_context)


if _extension.has_cpp():
    _register_compiled_op()
