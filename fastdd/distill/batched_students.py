"""Several trajectory-matching students computed together: :func:`batched_match_gradients`.

S independent students (each with its own expert pair, plan and targets) are stacked as one ``[S, P]`` parameter
tensor and run as one grouped network (:func:`fastdd.models.batched.batched_functional_forward`): every student step
is one forward and one backward for all S students instead of S small ones. A step's loss is the sum of the
students' step losses, so its gradient with respect to row ``s`` of the parameters is student ``s``'s own gradient
(the students share nothing), and the matching loss is the sum of the students' matching losses, whose gradient
with respect to the images and the step size is the sum of the students' gradients. The three modes of
:func:`fastdd.distill.trajectory.match_gradients` (``unrolled``, ``exact``, ``compat``) and its ``keep_graphs`` and
``precision`` run unchanged on the stacked parameters (:func:`fastdd.distill.trajectory.unroll_gradients`).

Every student draws its plan (minibatches, augmentation parameters, input masks) from its own generator in the
order :func:`match_gradients` draws them, so S students here equal S calls of ``match_gradients`` with the same
generators (up to float rounding; float64 test in tests/test_batched_students.py). At a step all students' minibatches
have the same size (every student cuts its permutations into the same chunk sizes). Their rows are augmented in one
:func:`fastdd.ops.diff_augment` call per distinct family list (DSA's mode "S" draws one family per student step, so
students may differ; their parameters are concatenated with :func:`fastdd.ops.augment.cat_augment_params`).

The students' network must be a ConvNet with instancenorm or no norm (:func:`supports_batched_students`); rows are
not split over processes here (``match_gradients``' ``row_shard``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdd.distill.trajectory import (
    Augment,
    InputMask,
    StepLoss,
    StepTargets,
    StudentPlan,
    Targets,
    _student_input,
    _targets_loss,
    check_arguments,
    matching_tensors,
    plan_and_targets,
    unroll_gradients,
)
from fastdd.models.batched import batched_functional_forward, supports_batched_students
from fastdd.ops import AugmentParams, diff_augment
from fastdd.ops.augment import cat_augment_params
from fastdd.precision import at_least_float32, autocast
from fastdd.runtime import kept_heap
from fastdd.trust.outlier_loss import integrated_loss


@dataclass
class GroupedStep:
    """One student step of S students together.

    Attributes:
        idx: ``[S * b]`` image indices, student ``s``'s minibatch in rows ``s * b : (s + 1) * b``.
        rows: ``b``, the minibatch size of every student at this step.
        augment: ``(students, params)`` per distinct augmentation family list: the rows of those students (in
            student order) are augmented in one call with their concatenated parameters. Empty: no augmentation.
        mask: ``[S * b, 1, H, W]`` (or ``[S * b, C, H, W]``) input mask of the rows, or None.
        targets: each student's :class:`~fastdd.distill.trajectory.StepTargets`.
    """

    idx: torch.Tensor
    rows: int
    augment: list[tuple[list[int], AugmentParams]]
    mask: torch.Tensor | None
    targets: list[StepTargets]


def group_step(plans: Sequence[StudentPlan], targets: Sequence[Sequence[StepTargets]], step: int) -> GroupedStep:
    """Step ``step`` of the students whose plans and targets are given, as one :class:`GroupedStep`."""
    batches = [plan.batches[step] for plan in plans]
    rows = batches[0].numel()
    if any(b.numel() != rows for b in batches):
        raise ValueError(f"batched students need minibatches of one size at every step, got "
                         f"{[b.numel() for b in batches]} at step {step}")
    params = [plan.augment[step] for plan in plans]
    groups: dict[tuple, list[int]] = {}
    if params[0] is not None:
        for s, p in enumerate(params):
            groups.setdefault(p.signature(), []).append(s)
    augment = [(students, cat_augment_params([params[s] for s in students], [rows] * len(students)))
               for students in groups.values()]
    masks = [plan.masks[step] for plan in plans]
    return GroupedStep(
        idx=torch.cat(batches),
        rows=rows,
        augment=augment,
        mask=None if masks[0] is None else torch.cat(masks),
        targets=[t[step] for t in targets],
    )


def _grouped_input(batch: torch.Tensor, step: GroupedStep) -> torch.Tensor:
    """The rows the students' networks see: each student's minibatch augmented with its own parameters (one call
    per family list), then times its mask."""
    if len(step.augment) <= 1:
        return _student_input(batch, step.augment[0][1] if step.augment else None, step.mask)
    b = step.rows
    chunks: dict[int, torch.Tensor] = {}
    for students, params in step.augment:
        rows = torch.cat([batch[s * b:(s + 1) * b] for s in students])
        for s, chunk in zip(students, diff_augment(rows, params).split(b)):
            chunks[s] = chunk
    x = torch.cat([chunks[s] for s in range(len(chunks))])
    return x if step.mask is None else x * step.mask


def grouped_step_loss(net, theta: torch.Tensor, batch: torch.Tensor, step: GroupedStep) -> torch.Tensor:
    """The sum of the students' step losses with parameters ``theta`` ``[S, P]`` on ``batch = images[step.idx]``."""
    x = _grouped_input(batch, step)
    students = theta.shape[0]
    with autocast(step.targets[0].precision, x.device):
        logits = batched_functional_forward(net, theta, x.reshape(students, step.rows, *x.shape[1:]))
    logits = at_least_float32(logits)
    total = _targets_loss(logits[0], step.targets[0])
    for s in range(1, students):
        total = total + _targets_loss(logits[s], step.targets[s])
    return total


@kept_heap()
def batched_match_gradients(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: Targets | Sequence[Targets],
    start_params: torch.Tensor,
    target_params: torch.Tensor,
    syn_lr: torch.Tensor | float,
    *,
    syn_steps: int,
    generators: Sequence[torch.Generator],
    batch_syn: int | None = None,
    mode: str = "exact",
    augment: Augment = None,
    unlabelled: torch.Tensor | None = None,
    step_loss: StepLoss = integrated_loss,
    input_mask: InputMask | None = None,
    keep_graphs: int = 1,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~fastdd.distill.trajectory.match_gradients` of S students at once, as one grouped network.

    Args:
        net: a ConvNet with norm "instancenorm" or "none"; only its architecture is used.
        images: ``[n, C, H, W]`` synthetic images (with the unlabelled rows, if any).
        labels: the targets every student uses (as in ``match_gradients``), or a sequence of S of them, one per
            student (e.g. soft labels from each student's target expert).
        start_params, target_params: ``[S, P]``: student ``s`` starts at ``start_params[s]`` and matches
            ``target_params[s]``.
        syn_lr: the student learning rate (float or 0-d tensor), shared by the students.
        syn_steps, batch_syn, mode, augment, unlabelled, step_loss, input_mask, keep_graphs, precision: as in
            ``match_gradients`` (``keep_graphs`` kept steps hold the graph of all S students each).
        generators: S generators; student ``s`` draws its plan from ``generators[s]`` exactly as
            ``match_gradients(..., generator=generators[s])`` does.

    Returns:
        ``(losses, grad_images, grad_lr)``: ``[S]`` detached matching losses (student ``s``'s in entry ``s``), and
        the sums over the students of their ``[n, C, H, W]`` image gradients and 0-d step-size gradients, all in
        ``images``' dtype.
    """
    students = len(generators)
    per_student = not isinstance(labels, torch.Tensor) and isinstance(labels, Sequence)
    for y in (labels if per_student else [labels]):
        check_arguments(net, images, y, unlabelled, mode=mode, syn_steps=syn_steps, keep_graphs=keep_graphs,
                        precision=precision)
    if not supports_batched_students(net):
        raise ValueError(f"batched students need a ConvNet with norm 'instancenorm' or 'none', got "
                         f"{type(net).__name__}{' with norm ' + repr(net.norm) if hasattr(net, 'norm') else ''}")
    if students < 1:
        raise ValueError("batched_match_gradients needs at least one generator (one per student)")
    if per_student and len(labels) != students:
        raise ValueError(f"labels holds {len(labels)} targets but there are {students} generators (students)")
    images, alpha, theta0, target = matching_tensors(net, images, syn_lr, start_params, target_params, students)
    host_unlabelled = None if unlabelled is None else unlabelled.cpu()
    plans, targets = [], []
    for s, generator in enumerate(generators):
        plan, step_targets = plan_and_targets(
            images, labels[s] if per_student else labels, host_unlabelled, syn_steps=syn_steps, batch_syn=batch_syn,
            augment=augment, generator=generator, step_loss=step_loss, input_mask=input_mask, precision=precision,
        )
        plans.append(plan)
        targets.append(step_targets)
    steps = [group_step(plans, targets, i) for i in range(syn_steps)]
    denominator = ((theta0 - target) ** 2).sum(-1)

    def loss_at(i: int, theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        return grouped_step_loss(net, theta, batch, steps[i])

    return unroll_gradients(loss_at, images, [step.idx for step in steps], theta0, target, alpha, denominator,
                            mode=mode, precision=precision, keep_graphs=keep_graphs)
