"""The trajectory-matching gradient (MTT), computed three ways.

A student starts at an expert's snapshot ``theta_0`` and takes ``N`` SGD steps on (augmented) minibatches of the
synthetic images with learning rate ``alpha``::

    theta_{i+1} = theta_i - alpha * grad_theta CE(f(A_i(S[b_i]), theta_i), y[b_i])
    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2

``match_gradients`` returns ``L`` and its gradients with respect to the images ``S`` and to ``alpha``:

- ``"unrolled"``: autograd through the whole unroll (MTT's reference semantics; memory grows with ``N``).
- ``"exact"``: the same gradient by reverse accumulation over the stored ``theta_i`` (an adjoint pass). Only the
  ``N + 1`` parameter vectors and one step's graph are alive at a time, so memory is flat in ``N``.
- ``"compat"``: TESLA's published semantics: the gradient of a stop-gradient unroll, which drops every path through
  ``theta_i``'s own dependence on ``S`` (no Hessian terms). Offered to compare with the paper.

All three draw the minibatches and augmentation parameters in the same order from ``generator``, so the same
generator state gives the same student in every mode.

With an ``input_mask`` sampler (a plug-in's, e.g. MDT's :class:`fastdd.trust.mdt.MaskedDistillation`) every
student step's input is ``M_i * A_i(S[b_i])``: its augmented minibatch times a fresh mask ``M_i`` (``[b, 1, H, W]``).
The masks are drawn with the rest of the plan and replayed, so every mode trains the same masked student; unlabelled
rows are masked like the labelled ones.

``images`` may hold unlabelled rows (marked by ``unlabelled``, e.g. TrustDD's S_out): a student step's loss is then
``step_loss(logits of labelled rows, their targets, logits of unlabelled rows)``, by default
:func:`fastdd.trust.outlier_loss.integrated_loss` (cross-entropy alone when a minibatch has no unlabelled row).

Row splitting (``row_shard=(rank, world)``, ``exact`` and ``compat`` only, inside a process group): every process
draws the same plan, and computes only its share of every minibatch's rows (contiguous, by
``torch.tensor_split(range(b), world)``). Its loss terms are per-row sums divided by the global counts of the
minibatch (labelled rows for the cross-entropy, unlabelled rows for their term), so the processes' parameter
gradients sum to the full minibatch's. Each forward step's gradient is all-reduced (every process then holds the
same ``theta_i``), and in ``exact`` each reverse step's ``H_i @ lam`` too; the image and step-size gradients
returned are this process's part, to be summed over the processes by the caller. The rows must be independent (no
batchnorm).

The unroll itself (:func:`unroll_gradients`) takes any step loss of stacked parameters: S independent students as
one ``[S, P]`` tensor, run as one grouped network, go through the same three modes
(:func:`fastdd.distill.batched_students.batched_match_gradients`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Union

import torch

from fastdd.distill import distributed
from fastdd.models.functional import functional_forward, parameter_layout
from fastdd.ops import AugmentParams, diff_augment, sample_augment_params
from fastdd.precision import at_least_float32, autocast, check_precision, step_loss_scale
from fastdd.runtime import kept_heap
from fastdd.trust.outlier_loss import integrated_loss

MODES = ("exact", "compat", "unrolled")

# An augmentation is a DSA strategy string ("color_crop_..."), or a callable that samples the parameters for a batch.
AugmentSampler = Callable[[int, torch.Generator], AugmentParams]
Augment = Union[str, AugmentSampler, None]

# A per-step input mask: ``sampler(shape [b, C, H, W], generator, device) -> [b, 1, H, W]`` (see fastdd.trust.mdt).
InputMask = Callable[[tuple, torch.Generator, torch.device], torch.Tensor]

# A student step's loss: ``step_loss(logits_in, targets, logits_unlabelled or None, counts=None) -> 0-d`` (the
# signature of fastdd.trust.outlier_loss.integrated_loss; ``counts`` as there, for a share of a split minibatch).
StepLoss = Callable[..., torch.Tensor]


@dataclass
class StudentPlan:
    """The minibatch indices, augmentation parameters and input masks of every student step, drawn once and replayed.

    Attributes:
        batches: ``syn_steps`` LongTensors of image indices (on the images' device).
        augment: per step, the augmentation parameters of that minibatch (one transform per image), or None.
        masks: per step, the ``[b, 1, H, W]`` mask that multiplies the augmented minibatch, or None (no input mask).
        host_batches: the same indices on the CPU, for decisions about rows that must not wait for the device.
    """

    batches: list[torch.Tensor]
    augment: list[AugmentParams | None]
    masks: list[torch.Tensor | None]
    host_batches: list[torch.Tensor] = field(default_factory=list)


def plan_student(
    num_images: int,
    image_size: tuple[int, int],
    *,
    syn_steps: int,
    batch_syn: int | None,
    augment: Augment,
    generator: torch.Generator | None,
    device: torch.device,
    input_mask: InputMask | None = None,
    channels: int = 1,
) -> StudentPlan:
    """Draw the minibatches (chunks of fresh permutations, as MTT does), their augmentation parameters and masks.

    The draws alternate per step: permutation (when the previous one is used up), then that step's augmentation, then
    its mask from ``input_mask``, asked for images of shape ``[b, channels, H, W]`` (it returns ``[b, 1, H, W]`` for
    a mask shared over channels). Without ``input_mask`` no mask is drawn (``masks`` holds None).
    """
    batch = num_images if batch_syn is None else batch_syn
    if not 1 <= batch <= num_images:
        raise ValueError(f"batch_syn must be in [1, {num_images}], got {batch_syn}")
    if generator is None:
        generator = torch.Generator()
    sampler = _augment_sampler(augment, image_size, device)
    batches: list[torch.Tensor] = []
    params: list[AugmentParams | None] = []
    masks: list[torch.Tensor | None] = []
    host_batches: list[torch.Tensor] = []
    chunks: list[torch.Tensor] = []
    for _ in range(syn_steps):
        if not chunks:
            chunks = list(torch.randperm(num_images, generator=generator).split(batch))
        idx = chunks.pop(0)
        batches.append(idx.to(device))
        host_batches.append(idx)
        params.append(sampler(idx.numel(), generator) if sampler is not None else None)
        shape = (idx.numel(), channels, *image_size)
        masks.append(None if input_mask is None else input_mask(shape, generator, device))
    return StudentPlan(batches, params, masks, host_batches)


def _augment_sampler(augment: Augment, image_size: tuple[int, int], device: torch.device) -> AugmentSampler | None:
    if augment is None or augment == "":
        return None
    if isinstance(augment, str):
        strategy = augment

        def sample(batch: int, generator: torch.Generator) -> AugmentParams:
            return sample_augment_params(batch, image_size, strategy=strategy, generator=generator, device=device)

        return sample
    if callable(augment):
        return augment
    raise TypeError(f"augment must be None, a DSA strategy string or a callable, got {type(augment).__name__}")


# Targets: [n] labels, [n, classes] soft labels, or a callable giving the targets of an index tensor.
Targets = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class StepTargets:
    """What one student step's loss compares the minibatch with.

    Attributes:
        labels: targets of the minibatch's labelled rows, in row order (``[b_in]`` or ``[b_in, classes]``).
        unlabelled: ``[b]`` bool on the CPU, True on unlabelled rows, or None when the minibatch has none (on the
            CPU, selecting rows by it needs no device sync).
        loss: the step loss (:data:`StepLoss`).
    """

    labels: torch.Tensor
    unlabelled: torch.Tensor | None = None
    loss: StepLoss = integrated_loss
    # Row splitting: (labelled rows, unlabelled rows) of the whole minibatch, of which these rows are a share; the loss
    # is then a per-row sum over these rows divided by those counts. None: these rows are the whole minibatch.
    global_counts: tuple[int, int] | None = None
    # The forward pass's precision (fastdd.precision); the logits and the loss are float32 (or the images' dtype).
    precision: str = "fp32"


def _step_loss(net, theta, batch, params, mask, target: StepTargets) -> torch.Tensor:
    """The student's loss with flat parameters ``theta`` on the (augmented, then masked) minibatch ``batch``. With
    ``target.global_counts`` the rows are a share of a split minibatch: per-row sums divided by the minibatch's
    counts, so that the shares sum to the whole minibatch's loss."""
    x = _student_input(batch, params, mask)
    with autocast(target.precision, x.device):
        logits = functional_forward(net, theta, x)
    return _targets_loss(at_least_float32(logits), target)


def _student_input(batch: torch.Tensor, params: AugmentParams | None, mask: torch.Tensor | None) -> torch.Tensor:
    """What a student step's network sees: the minibatch augmented with ``params``, then times ``mask``."""
    x = diff_augment(batch, params) if params is not None else batch
    if mask is not None:
        x = x * mask
    return x


def _targets_loss(logits: torch.Tensor, target: StepTargets) -> torch.Tensor:
    """The step loss of one student's minibatch logits ``[b, K]`` (in the parameters' dtype) against ``target``."""
    rows = target.unlabelled
    if rows is None:
        return target.loss(logits, target.labels, None, counts=target.global_counts)
    return target.loss(logits[~rows], target.labels, logits[rows], counts=target.global_counts)


def _loss_fn(net, params, mask, target: StepTargets) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(theta, batch)``: :func:`_step_loss` of one step's augmentation, mask and targets."""
    return lambda theta, batch: _step_loss(net, theta, batch, params, mask, target)


@kept_heap()
def match_gradients(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: Targets,
    start_params: torch.Tensor,
    target_params: torch.Tensor,
    syn_lr: torch.Tensor | float,
    *,
    syn_steps: int,
    batch_syn: int | None = None,
    mode: str = "exact",
    augment: Augment = None,
    generator: torch.Generator | None = None,
    unlabelled: torch.Tensor | None = None,
    step_loss: StepLoss = integrated_loss,
    input_mask: InputMask | None = None,
    row_shard: tuple[int, int] | None = None,
    keep_graphs: int = 1,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The trajectory-matching loss and its gradients with respect to the images and the student learning rate.

    Args:
        net: any fastdd model; only its architecture (and buffers) are used.
        images: ``[n, C, H, W]`` synthetic images.
        labels: ``[n]`` int64 class labels, ``[n, num_classes]`` soft targets, or a callable mapping an index tensor
            ``[b]`` to the targets of those images (so soft labels are computed only for the images a step uses).
            Targets are constants: no gradient flows through them.
        start_params: ``[P]`` expert snapshot the student starts from, in
            ``parameters_to_vector(net.parameters())`` order.
        target_params: ``[P]`` expert snapshot ``expert_epochs`` later.
        syn_lr: the student learning rate ``alpha`` (float or 0-d tensor).
        syn_steps: number of student steps ``N`` (>= 1).
        batch_syn: minibatch size; None means all images every step.
        mode: ``"exact"``, ``"compat"`` or ``"unrolled"`` (see the module docstring).
        augment: None (no augmentation), a DSA strategy string, or ``sampler(batch, generator) -> AugmentParams``.
        generator: source of minibatch orders and augmentation parameters.
        unlabelled: ``[n]`` bool marking unlabelled images (e.g. TrustDD's S_out: their entries of ``labels`` are
            ignored and a callable ``labels`` is only asked for the other rows), or None.
        step_loss: the loss of a student step (:data:`StepLoss`); the default is TrustDD's integrated loss at
            lambda 0.5, plain cross-entropy on a minibatch without unlabelled rows.
        input_mask: a sampler of a fresh mask per step that multiplies the augmented minibatch (e.g. MDT's,
            :func:`fastdd.trust.mdt.mask_sampler`), or None (the default): no masking and no draws.
        row_shard: ``(rank, world)``: split every minibatch's rows over the ``world`` processes of the current
            process group (``exact`` and ``compat`` only; see the module docstring). None (the default): one process
            computes every row.
        keep_graphs: ``exact`` and ``compat``: the number of final student steps whose graphs the forward sweep
            keeps, so the reverse pass does not recompute them (a forward and a backward saved per step, at the
            memory of one step's graph each; memory stays flat in ``syn_steps``). 1 (the default) keeps only the
            last step, which costs no memory beyond the reverse pass's own peak. Not combined with ``row_shard``.
        precision: ``"fp32"`` (the default), ``"bf16"`` or ``"fp16"`` (CUDA only): the student's forward passes run
            under autocast in that dtype (:mod:`fastdd.precision`); the images, ``syn_lr``, the student parameters,
            the losses and every returned gradient stay in ``images``' dtype. fp16 scales each step's loss by
            :data:`fastdd.precision.FP16_STEP_LOSS_SCALE` before its parameter gradient is taken.

    Returns:
        ``(loss, grad_images, grad_lr)``: 0-d detached loss, ``[n, C, H, W]`` gradient for ``images`` and a 0-d
        gradient for ``syn_lr``, all in ``images``' dtype. With ``row_shard`` the loss is the full loss (the same on
        every process) and the two gradients are this process's part: their sums over the processes are the full
        gradients.
    """
    check_arguments(net, images, labels, unlabelled, mode=mode, syn_steps=syn_steps, keep_graphs=keep_graphs,
                    precision=precision)
    if keep_graphs > 1 and row_shard is not None:
        raise ValueError("keep_graphs applies to the exact and compat modes in one process (no row_shard)")
    images, alpha, theta0, target = matching_tensors(net, images, syn_lr, start_params, target_params)
    # The row mask is read once here: every step's row decisions are then taken on the CPU without a device sync.
    host_unlabelled = None if unlabelled is None else unlabelled.cpu()
    plan, targets = plan_and_targets(
        images, labels, host_unlabelled, syn_steps=syn_steps, batch_syn=batch_syn, augment=augment,
        generator=generator, step_loss=step_loss, input_mask=input_mask, precision=precision,
    )
    denominator = ((theta0 - target) ** 2).sum()
    if row_shard is not None:
        if mode == "unrolled":
            raise ValueError("row_shard applies to the exact and compat modes only, not to unrolled")
        rank, world = row_shard
        shares = [_row_share(plan, targets, labels, i, rank, world) for i in range(len(plan.batches))]
        return _split_reverse_accumulation(
            net, images, shares, theta0, target, alpha, denominator, exact=mode == "exact"
        )

    def loss_at(i: int, theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return _step_loss(net, theta, batch, plan.augment[i], plan.masks[i], targets[i])

    return unroll_gradients(loss_at, images, plan.batches, theta0, target, alpha, denominator, mode=mode,
                            precision=precision, keep_graphs=keep_graphs)


def matching_tensors(net, images, syn_lr, start_params, target_params, students: int | None = None):
    """``(images, alpha, theta0, target)``: the inputs detached, in the images' dtype, with ``alpha`` 0-d, after
    checking that the snapshots are ``[P]`` (``[students, P]`` for batched students)."""
    numel = parameter_layout(net).numel
    shape = (numel,) if students is None else (students, numel)
    if start_params.shape != shape or target_params.shape != shape:
        rows = "" if students is None else " (one row per generator)"
        raise ValueError(
            f"start_params and target_params must be [{', '.join(map(str, shape))}]{rows}, got "
            f"{tuple(start_params.shape)} and {tuple(target_params.shape)}"
        )
    images = images.detach()
    alpha = torch.as_tensor(syn_lr, dtype=images.dtype, device=images.device).detach().reshape(())
    return images, alpha, start_params.detach().to(images.dtype), target_params.detach().to(images.dtype)


def check_arguments(net, images, labels, unlabelled, *, mode: str, syn_steps: int, keep_graphs: int,
                    precision: str) -> None:
    """The argument checks :func:`match_gradients` and its batched counterpart share (ValueError, one sentence)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_precision(precision, images.device)
    if syn_steps < 1:
        raise ValueError(f"syn_steps must be at least 1, got {syn_steps}")
    if keep_graphs < 1:
        raise ValueError(f"keep_graphs must be at least 1, got {keep_graphs}")
    if keep_graphs > 1 and mode == "unrolled":
        raise ValueError("keep_graphs applies to the exact and compat modes in one process (no row_shard)")
    if images.dim() != 4:
        raise ValueError(f"images must be [n, C, H, W], got shape {tuple(images.shape)}")
    if isinstance(labels, torch.Tensor) and labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    if unlabelled is not None and (unlabelled.dtype != torch.bool or unlabelled.shape != (images.shape[0],)):
        raise ValueError(
            f"unlabelled must be a bool tensor [{images.shape[0]}], got {unlabelled.dtype} {tuple(unlabelled.shape)}"
        )


def plan_and_targets(
    images: torch.Tensor,
    labels: Targets,
    host_unlabelled: torch.Tensor | None,
    *,
    syn_steps: int,
    batch_syn: int | None,
    augment: Augment,
    generator: torch.Generator | None,
    step_loss: StepLoss,
    input_mask: InputMask | None,
    precision: str,
) -> tuple[StudentPlan, list[StepTargets]]:
    """One student's plan (:func:`plan_student`, masks in the images' dtype) and every step's targets, drawn from
    ``generator`` in the order :func:`match_gradients` draws them."""
    plan = plan_student(
        images.shape[0],
        tuple(images.shape[-2:]),
        syn_steps=syn_steps,
        batch_syn=batch_syn,
        augment=augment,
        generator=generator,
        device=images.device,
        input_mask=input_mask,
        channels=images.shape[1],
    )
    plan.masks = [None if m is None else m.to(images.dtype) for m in plan.masks]
    targets = [_step_targets(labels, idx, host_idx, host_unlabelled, step_loss, precision)
               for idx, host_idx in zip(plan.batches, plan.host_batches)]
    return plan, targets


def _step_targets(labels: Targets, idx: torch.Tensor, host_idx: torch.Tensor, host_unlabelled: torch.Tensor | None,
                  step_loss: StepLoss, precision: str = "fp32") -> StepTargets:
    rows = None if host_unlabelled is None else host_unlabelled[host_idx]
    if rows is not None and not bool(rows.any()):
        rows = None
    labelled = idx if rows is None else idx[~rows]
    y = labels[labelled] if isinstance(labels, torch.Tensor) else labels(labelled)
    return StepTargets(y.detach(), rows, step_loss, precision=precision)


# ``loss_at(step, theta, batch) -> 0-d``: the loss of student step ``step`` with parameters ``theta`` ([P], or [S, P]
# for S students computed together, the sum of their losses) on the minibatch ``batch = images[batches[step]]``.
LossAt = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def unroll_gradients(
    loss_at: LossAt,
    images: torch.Tensor,
    batches: list[torch.Tensor],
    theta0: torch.Tensor,
    target: torch.Tensor,
    alpha: torch.Tensor,
    denominator: torch.Tensor,
    *,
    mode: str,
    precision: str,
    keep_graphs: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matching loss of ``len(batches)`` SGD steps from ``theta0`` and its gradients, in ``mode``.

    ``theta0`` and ``target`` are ``[P]`` (one student) or ``[S, P]`` (S independent students whose summed step
    losses ``loss_at`` gives: each row's gradient is then its own student's); ``denominator`` is ``[]`` or ``[S]``.
    Returns ``(loss, grad_images, grad_lr)``: the detached loss of each student (``[]`` or ``[S]``) and the
    gradients of their sum.
    """
    if mode == "unrolled":
        return _unrolled(loss_at, images, batches, theta0, target, alpha, denominator, precision)
    return _reverse_accumulation(loss_at, images, batches, theta0, target, alpha, denominator, precision,
                                 exact=mode == "exact", keep_graphs=keep_graphs)


def _matching(residual: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``||theta_N - theta*||^2 / ||theta_0 - theta*||^2`` of each student: ``[]`` for ``[P]``, ``[S]`` for
    ``[S, P]``."""
    return (residual**2).sum(-1) / denominator


def _unrolled(loss_at, images, batches, theta0, target, alpha, denominator, precision):
    images = images.requires_grad_(True)
    alpha = alpha.clone().requires_grad_(True)
    theta = theta0.clone().requires_grad_(True)
    for i, idx in enumerate(batches):
        grad = _parameter_gradient(loss_at(i, theta, images[idx]), theta, precision, create_graph=True)
        theta = theta - alpha * grad
    matching = _matching(theta - target, denominator)
    grad_images, grad_lr = torch.autograd.grad(matching.sum() if matching.dim() else matching, (images, alpha))
    return matching.detach(), grad_images, grad_lr


def _differentiable_step(loss_fn, theta, images, idx, precision):
    """One student step's gradient with its graph kept: ``(theta, batch, grad)``, with ``theta`` and the minibatch
    ``batch = images[idx]`` as leaves, so the graph can be differentiated again with respect to both."""
    theta = theta.clone().requires_grad_(True)  # a view of the stored thetas would see their later writes
    batch = images[idx].requires_grad_(True)
    grad = _parameter_gradient(loss_fn(theta, batch), theta, precision, create_graph=True)
    return theta, batch, grad


def _step_gradient(loss_fn, theta, batch, precision) -> torch.Tensor:
    """One student step's parameter gradient at the stored ``theta`` on the minibatch ``batch``, no graph kept."""
    theta = theta.detach().requires_grad_(True)
    return _parameter_gradient(loss_fn(theta, batch), theta, precision)


def _parameter_gradient(loss: torch.Tensor, theta: torch.Tensor, precision: str, create_graph: bool = False):
    """``d loss / d theta``, through a loss scaled by :func:`fastdd.precision.step_loss_scale` (exact: a power of
    two) so that fp16 activation gradients do not underflow."""
    scale = step_loss_scale(precision)
    if scale == 1.0:
        return torch.autograd.grad(loss, theta, create_graph=create_graph)[0]
    return torch.autograd.grad(loss * scale, theta, create_graph=create_graph)[0] / scale


def _adjoint_terms(theta, batch, grad, lam, exact: bool):
    """One reverse step from :func:`_differentiable_step`'s ``(theta, batch, grad)``: ``(d_batch, hvp, directional)``
    with ``directional = <grad, lam>``, ``d_batch`` its gradient w.r.t. the minibatch and ``hvp = H @ lam`` its
    gradient w.r.t. theta (None unless ``exact``)."""
    directional = (grad * lam).sum()
    if exact:
        d_batch, hvp = torch.autograd.grad(directional, (batch, theta))
    else:
        (d_batch,) = torch.autograd.grad(directional, batch)
        hvp = None
    return d_batch, hvp, directional.detach()


def _reverse_accumulation(
    loss_at, images, batches, theta0, target, alpha, denominator, precision, *, exact: bool, keep_graphs: int = 1
):
    steps = len(batches)
    neg_alpha = -float(alpha)  # once: on CUDA, float() of a tensor is a device sync
    # Forward: store theta_0 .. theta_N in one preallocated [N + 1, P] tensor (no long-lived allocations between the
    # steps' large temporaries, so a heap allocator can reuse their memory), no graph kept across steps except for
    # the last keep_graphs steps: the backward pass starts with them instead of recomputing them (the last one costs
    # no memory beyond what that pass holds at its peak anyway; each further one holds one step's graph).
    thetas = theta0.new_empty(steps + 1, *theta0.shape)
    thetas[0] = theta0
    first_kept = max(0, steps - keep_graphs)
    step_loss = [partial(loss_at, i) for i in range(steps)]
    for i in range(first_kept):
        grad = _step_gradient(step_loss[i], thetas[i], images[batches[i]], precision)
        torch.add(thetas[i], grad, alpha=neg_alpha, out=thetas[i + 1])
    kept = {}
    for i in range(first_kept, steps):
        kept[i] = _differentiable_step(step_loss[i], thetas[i], images, batches[i], precision)
        torch.add(thetas[i], kept[i][2].detach(), alpha=neg_alpha, out=thetas[i + 1])
    residual = thetas[-1] - target
    matching = _matching(residual, denominator)
    # Backward: lam = dL/dtheta_{i+1}; one double-backward per step gives the image term and H_i @ lam.
    lam = 2 * residual / denominator.unsqueeze(-1)
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    for i in reversed(range(steps)):
        idx = batches[i]
        if i in kept:
            theta, batch, grad = kept.pop(i)
        else:
            theta, batch, grad = _differentiable_step(step_loss[i], thetas[i], images, idx, precision)
        d_batch, hvp, directional = _adjoint_terms(theta, batch, grad, lam, exact)
        if exact:
            lam.add_(hvp, alpha=neg_alpha)
        grad_images.index_add_(0, idx, d_batch, alpha=neg_alpha)
        grad_lr.sub_(directional)
    return matching.detach(), grad_images, grad_lr


def _row_share(plan: StudentPlan, targets: list[StepTargets], labels: Targets, step: int, rank: int, world: int):
    """``(idx, augment, mask, targets)`` of this process's rows of minibatch ``step`` (``idx`` may be empty)."""
    idx, full = plan.batches[step], targets[step]
    rows = full.unlabelled
    unlabelled = 0 if rows is None else int(rows.sum())
    counts = (idx.numel() - unlabelled, unlabelled)
    host_positions = torch.tensor_split(torch.arange(idx.numel()), world)[rank]
    positions = host_positions.to(idx.device)
    if positions.numel() == 0:
        return idx[positions], None, None, None
    params, mask = plan.augment[step], plan.masks[step]
    share_rows = None if rows is None else rows[host_positions]
    local = idx[positions]
    if share_rows is not None and not bool(share_rows.any()):
        share_rows = None
    labelled = local if share_rows is None else local[~share_rows]
    y = labels[labelled] if isinstance(labels, torch.Tensor) else labels(labelled)
    return (
        local,
        None if params is None else params.select(positions),
        None if mask is None else mask[positions],
        StepTargets(y.detach(), share_rows, full.loss, counts, full.precision),
    )


def _split_reverse_accumulation(net, images, shares, theta0, target, alpha, denominator, *, exact: bool):
    """:func:`_reverse_accumulation` with every minibatch's rows split over the process group (see the module
    docstring): one all-reduce of ``[P]`` per forward step and, in exact mode, per reverse step."""
    steps = len(shares)
    neg_alpha = -float(alpha)
    thetas = theta0.new_empty(steps + 1, theta0.numel())
    thetas[0] = theta0
    for i, (idx, params, mask, targets) in enumerate(shares):
        if idx.numel() == 0:
            grad = torch.zeros_like(theta0)
        else:
            grad = _step_gradient(_loss_fn(net, params, mask, targets), thetas[i], images[idx], targets.precision)
        distributed.all_reduce_sum_([grad])
        torch.add(thetas[i], grad, alpha=neg_alpha, out=thetas[i + 1])
    residual = thetas[-1] - target
    matching = (residual**2).sum() / denominator
    lam = 2 * residual / denominator
    grad_images = torch.zeros_like(images)
    grad_lr = torch.zeros_like(alpha)
    for i in reversed(range(steps)):
        idx, params, mask, targets = shares[i]
        hvp = torch.zeros_like(lam) if exact else None
        if idx.numel() > 0:
            theta, batch, grad = _differentiable_step(_loss_fn(net, params, mask, targets), thetas[i], images, idx,
                                                      targets.precision)
            d_batch, hvp, directional = _adjoint_terms(theta, batch, grad, lam, exact)
            grad_images.index_add_(0, idx, d_batch, alpha=neg_alpha)
            grad_lr.sub_(directional)
        if exact:
            distributed.all_reduce_sum_([hvp])
            lam.add_(hvp, alpha=neg_alpha)
    return matching.detach(), grad_images, grad_lr
