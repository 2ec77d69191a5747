"""OAL (paper 003) as a training plug-in for networks trained on a synthetic set.

For a minibatch ``x`` with targets ``y`` the student network minimises (the paper's eq. 4)

    CE(z, y) + a1 * KL(softmax(z) || softmax(z_T)) + a2 * KL(softmax(f) || softmax(phi(f_T)))
             + beta * CLUB(proj(v), f) [+ gamma * CLUB(proj'(e), f)]

- ``z, f``: the student's logits and penultimate features (``embed``) of ``x``, from one forward pass;
- ``z_T, f_T``: the teacher's logits and features of the same ``x`` (eval mode, no gradient);
- IDKD: both KL terms put the student's distribution first, ``KL(p || q) = sum p (log p - log q)``, as the paper
  writes them; ``phi`` is a Linear-ReLU-Linear network from the teacher's feature size to the student's;
- MICL: ``v`` is a random batch (one outlier per ID row) of boundary outliers found once in the teacher's
  normalised feature space (:mod:`fastdd.trust.boundary_outliers`), ``proj`` maps it to the student's feature size,
  and CLUB (:mod:`fastdd.trust.club`) estimates the mutual information between ``proj(v)`` and ``f``, paired row by
  row. The optional second MICL term takes outlier embeddings ``e`` from a pluggable source
  (``extra_outliers(n, generator) -> [n, w]``; the paper's come from Stable Diffusion latents, whose weights cannot
  be fetched here, so none ships).

``phi`` and ``proj`` are trained with the network (the evaluation loop adds the objective's trainable parameters to
its SGD optimiser). The CLUB networks q are not: their parameters keep ``requires_grad = False``, so the model loss
never reaches them and that optimiser skips them. Instead, in every call, q first takes ``q_steps`` Adam steps
(lr ``q_lr``) on its own negative log-likelihood of the detached ``(proj(v), f)`` pairs, then the model loss is
computed with q fixed (the CLUB authors' recipe: several q steps per model step).

Defaults: ``a1 = 4, a2 = 8, beta = 0.1, gamma = 0.2`` (the paper's CIFAR weights), ``q_steps = 5``, ``q_lr = 1e-4``
(the CLUB recipe). The paper gives no sizes for phi, proj or q; 512 hidden units for phi/proj and a CLUB ``hidden``
of 512 (256 units per head) keep their cost well under that of the student's own forward and backward pass at
2,048-d ConvNet features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdd.models.init import init_parameters
from fastdd.precision import at_least_float32
from fastdd.trust.boundary_outliers import (
    DEFAULT_K,
    DEFAULT_KEEP,
    DEFAULT_NUM_ANCHORS,
    DEFAULT_SAMPLES_PER_ANCHOR,
    DEFAULT_SIGMA,
    boundary_outliers,
    per_class_boundary_outliers,
)
from fastdd.trust.club import CLUB

DEFAULT_A1 = 4.0
DEFAULT_A2 = 8.0
DEFAULT_BETA = 0.1
DEFAULT_GAMMA = 0.2
DEFAULT_Q_STEPS = 5
DEFAULT_Q_LR = 1e-4
DEFAULT_HIDDEN = 512
DEFAULT_CLUB_HIDDEN = 512
DEFAULT_PER_CLASS = 1000

RECIPES = ("fastdd", "authors")
# The authors' recipe (HengGao12/OAML, generative_ood_distill_trainer.py): the CLUB networks sit in the model's SGD
# optimiser with this learning rate; the outliers are searched per class with these settings (their file names:
# "noise_0.07_select_50_KNN_300"; 1,500 Gaussian candidates per anchor, 2 kept) and 1,000 are kept per class.
AUTHORS_CLUB_LR = 1e-4
AUTHORS_K = 300
AUTHORS_NUM_ANCHORS = 50
AUTHORS_SAMPLES_PER_ANCHOR = 1500
AUTHORS_KEEP = 2
AUTHORS_OUTLIERS_PER_CLASS = 1000

ExtraOutlierSource = Callable[[int, torch.Generator], Tensor]
"""``source(n, generator) -> [n, w]`` outlier embeddings (no gradient needed), drawn from ``generator``."""


def head_of(net: nn.Module) -> nn.Module:
    """The last Linear layer of a fastdd network (``classifier``, or ``fc`` in ResNet18): ``forward = head(embed)``."""
    head = getattr(net, "classifier", None) or getattr(net, "fc", None)
    if not isinstance(head, nn.Module) or not hasattr(net, "embed"):
        raise TypeError(f"OAL needs a network with embed() and a classifier/fc head, got {type(net).__name__}")
    return head


def logits_and_features(net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(net(x) [B, K], net.embed(x) [B, d])`` from one forward pass, both with graph.

    Unlike :func:`fastdd.trust.robust.logits_and_embedding` (which detaches the features and gives up with
    batchnorm), OAL needs the features' gradient; ``head(embed(x))`` is exactly ``forward(x)`` for every fastdd
    network, batchnorm in train mode included, so the features are those of the training forward pass.
    """
    features = net.embed(x)
    return at_least_float32(head_of(net)(features)), at_least_float32(features)  # float32 losses under autocast


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def _authors_phi(in_dim: int, out_dim: int) -> nn.Sequential:
    """The authors' feature adapter (their ``DT``): BatchNorm -> Linear -> ReLU -> BatchNorm."""
    return nn.Sequential(nn.BatchNorm1d(in_dim), nn.Linear(in_dim, out_dim), nn.ReLU(), nn.BatchNorm1d(out_dim))


KL_DIRECTIONS = ("student-teacher", "teacher-student")


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """``mean_b KL(softmax(p_logits_b) || softmax(q_logits_b))``: the first argument's distribution first (in float32
    at least, whatever precision autocast gave the logits)."""
    log_p = F.log_softmax(at_least_float32(p_logits), dim=1)
    log_q = F.log_softmax(at_least_float32(q_logits), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


class OALObjective(nn.Module):
    """OAL's training loss as a ``TrainObjective``: ``objective(net, inputs, targets, generator) -> 0-d loss``.

    Args:
        teacher: the teacher network (``embed`` + ``classifier``/``fc``), in eval mode without gradient, on the
            device the student trains on. It is held, not registered: ``parameters()``, ``state_dict()`` and
            ``train()`` leave it alone.
        outliers: ``[L, D_out]`` boundary outliers in the teacher's feature space (:func:`boundary_outliers`).
        student_dim: d, the student's penultimate feature size (``net.feature_dim``).
        teacher_dim: D, the teacher's feature size; None reads ``teacher.feature_dim``.
        a1, a2, beta, gamma: the loss weights. A zero weight skips its term entirely (no teacher forward when
            ``a1 = a2 = 0``, no q steps when ``beta = 0``).
        q_steps, q_lr: q's Adam steps per call and their learning rate.
        hidden: hidden units of phi, proj (and proj').
        club_hidden: the CLUB networks' ``hidden`` (each head has half as many units).
        extra_outliers, extra_dim: the optional second outlier source (:data:`ExtraOutlierSource`) and the size w
            of its embeddings; the gamma term exists only when a source is given.
        kl: the direction of both IDKD terms: ``"student-teacher"`` (``KL(student || teacher)``, the paper's eq. 4
            as written) or ``"teacher-student"`` (``KL(teacher || student)``, what the authors' code computes with
            ``KLDivLoss(log_softmax(student), softmax(teacher))``).
        generator: source of the initial parameters of phi, proj and q (PyTorch's default laws), which are built
            on the generator's device; move the objective with ``.to(device)`` before its first call.
        recipe: ``"fastdd"`` (as above) or ``"authors"`` (their code): phi is BatchNorm -> Linear -> ReLU ->
            BatchNorm, there is no ``proj`` (q reads the outliers themselves, ``x_dim`` = their size), and q is
            trained by the model loss in the model's optimiser at ``AUTHORS_CLUB_LR`` (:meth:`parameter_groups`),
            without its own likelihood steps, so ``q_steps`` and ``q_lr`` are unused. The second MICL term keeps
            fastdd's form.

    Attributes:
        last_parts: after each call, the parts of the loss as detached 0-d tensors: ``ce``, ``kl_logits``,
            ``kl_features``, ``micl``, ``q_nll`` (q's negative log-likelihood after its steps), with the extra
            source ``micl_extra`` and ``q_nll_extra``, and ``total``. Terms whose weight is 0 are absent.
    """

    def __init__(
        self,
        teacher: nn.Module,
        outliers: Tensor,
        *,
        student_dim: int,
        teacher_dim: int | None = None,
        a1: float = DEFAULT_A1,
        a2: float = DEFAULT_A2,
        beta: float = DEFAULT_BETA,
        gamma: float = DEFAULT_GAMMA,
        q_steps: int = DEFAULT_Q_STEPS,
        q_lr: float = DEFAULT_Q_LR,
        hidden: int = DEFAULT_HIDDEN,
        club_hidden: int = DEFAULT_CLUB_HIDDEN,
        extra_outliers: ExtraOutlierSource | None = None,
        extra_dim: int | None = None,
        generator: torch.Generator | None = None,
        kl: str = "student-teacher",
        recipe: str = "fastdd",
    ) -> None:
        super().__init__()
        if kl not in KL_DIRECTIONS:
            raise ValueError(f"OALObjective expects kl in {', '.join(KL_DIRECTIONS)}, got {kl!r}")
        if recipe not in RECIPES:
            raise ValueError(f"OALObjective expects recipe in {', '.join(RECIPES)}, got {recipe!r}")
        self.kl, self.recipe = kl, recipe
        authors = recipe == "authors"
        if outliers.dim() != 2 or outliers.shape[0] == 0:
            raise ValueError(f"OALObjective expects outliers [L, D] with L >= 1, got {tuple(outliers.shape)}")
        if min(a1, a2, beta, gamma) < 0 or q_steps < 0 or not q_lr > 0:
            raise ValueError(f"OALObjective expects weights >= 0, q_steps >= 0 and q_lr > 0, got a1={a1}, a2={a2}, "
                             f"beta={beta}, gamma={gamma}, q_steps={q_steps}, q_lr={q_lr}")
        if extra_outliers is not None and (extra_dim is None or extra_dim < 1):
            raise ValueError("OALObjective needs extra_dim (the size of the extra embeddings) with extra_outliers")
        head_of(teacher)
        teacher_dim = teacher_dim if teacher_dim is not None else int(teacher.feature_dim)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the class docstring
        self.a1, self.a2, self.beta, self.gamma = float(a1), float(a2), float(beta), float(gamma)
        self.q_steps, self.q_lr = int(q_steps), float(q_lr)
        self.extra_outliers = extra_outliers
        device = torch.get_default_device() if generator is None else generator.device
        self.register_buffer("outliers", outliers.detach().to(device, torch.float32).clone(), persistent=False)
        with torch.device("meta"):
            self.phi = _authors_phi(teacher_dim, student_dim) if authors else _mlp(teacher_dim, hidden, student_dim)
            self.proj = None if authors else _mlp(outliers.shape[1], hidden, student_dim)
            self.extra_proj = _mlp(extra_dim, hidden, student_dim) if extra_outliers is not None else None
        for module in (self.phi, self.proj, self.extra_proj):
            if module is not None:
                init_parameters(module.to_empty(device=device), generator)
        club_x = outliers.shape[1] if authors else student_dim
        self.club = CLUB(club_x, student_dim, club_hidden, generator=generator)
        self.extra_club = (
            CLUB(student_dim, student_dim, club_hidden, generator=generator) if extra_outliers is not None else None
        )
        for club in self._clubs():
            club.requires_grad_(False)
        if authors:
            self.club.requires_grad_(True)
        self._q_optimizers: dict[int, torch.optim.Optimizer] = {}
        self.last_parts: dict[str, Tensor] = {}

    def _clubs(self) -> list[CLUB]:
        return [c for c in (self.club, self.extra_club) if c is not None]

    def q_parameters(self) -> list[nn.Parameter]:
        """The CLUB networks' parameters (trained by the objective's own Adam, except the authors' recipe's q, which
        the model loss trains)."""
        return [p for club in self._clubs() for p in club.parameters()]

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The objective's trainable parameters as optimiser groups for a model optimiser of learning rate ``lr``:
        phi and proj at ``lr``; with the authors' recipe also q at ``AUTHORS_CLUB_LR``."""
        own = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("club.")]
        groups = [{"params": own, "lr": lr}]
        if self.recipe == "authors":
            groups.append({"params": list(self.club.parameters()), "lr": AUTHORS_CLUB_LR})
        return groups

    def _idkd(self, student: Tensor, teacher: Tensor) -> Tensor:
        """One IDKD term in this objective's KL direction (both arguments are logits)."""
        return _kl(student, teacher) if self.kl == "student-teacher" else _kl(teacher, student)

    def forward(self, net: nn.Module, inputs: Tensor, targets: Tensor, generator: torch.Generator) -> Tensor:
        """The OAL loss of one minibatch.

        Args:
            net: the student, in train mode.
            inputs: ``[B, C, H, W]`` the (augmented) minibatch.
            targets: ``[B]`` int64 labels or ``[B, K]`` probabilities (soft cross-entropy).
            generator: source of the outlier batch (and of the extra source's draws).

        Returns:
            0-d loss, differentiable w.r.t. the student and phi/proj (not q).
        """
        logits, features = logits_and_features(net, inputs)
        ce = F.cross_entropy(logits, targets)
        loss, parts = ce, {"ce": ce.detach()}
        if self.a1 > 0 or self.a2 > 0:
            teacher_logits, teacher_features = self._teacher(inputs, logits.shape[1])
            if self.a1 > 0:
                kl_logits = self._idkd(logits, teacher_logits)
                loss = loss + self.a1 * kl_logits
                parts["kl_logits"] = kl_logits.detach()
            if self.a2 > 0:
                kl_features = self._idkd(features, self.phi(teacher_features))
                loss = loss + self.a2 * kl_features
                parts["kl_features"] = kl_features.detach()
        batch = inputs.shape[0]
        if self.beta > 0:
            outliers = self.outliers[self._outlier_rows(batch, generator)]
            if self.recipe == "authors":
                micl = self.club.mi_upper_bound(outliers, features)
                with torch.no_grad():
                    q_nll = self.club.learning_loss(outliers, features)
            else:
                micl, q_nll = self._micl(self.club, self.proj(outliers), features)
            loss = loss + self.beta * micl
            parts.update(micl=micl.detach(), q_nll=q_nll)
        if self.gamma > 0 and self.extra_outliers is not None:
            extra = self.extra_outliers(batch, generator).to(features.device, features.dtype)
            micl_extra, q_nll_extra = self._micl(self.extra_club, self.extra_proj(extra), features)
            loss = loss + self.gamma * micl_extra
            parts.update(micl_extra=micl_extra.detach(), q_nll_extra=q_nll_extra)
        parts["total"] = loss.detach()
        self.last_parts = parts
        return loss

    @torch.no_grad()
    def _teacher(self, inputs: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Teacher logits (the first ``num_classes``, for a task restricted to fewer classes) and features."""
        teacher = self.teacher
        device = next(teacher.parameters()).device
        features = teacher.embed(inputs.to(device))
        logits = head_of(teacher)(features)
        if logits.shape[1] < num_classes:
            raise ValueError(f"the teacher has {logits.shape[1]} outputs but the student {num_classes}")
        return logits[:, :num_classes].to(inputs.device), features.to(inputs.device)

    def _outlier_rows(self, batch: int, generator: torch.Generator) -> Tensor:
        """``batch`` outlier indices: distinct when there are enough outliers, else drawn with replacement."""
        count = self.outliers.shape[0]
        if count >= batch:
            rows = torch.randperm(count, generator=generator, device=generator.device)[:batch]
        else:
            rows = torch.randint(count, (batch,), generator=generator, device=generator.device)
        return rows.to(self.outliers.device)

    def _micl(self, club: CLUB, projected: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """Train q on the detached pairs, then the CLUB estimate with q fixed: ``(estimate, q's last NLL)``."""
        q_nll = self._train_q(club, projected.detach(), features.detach())
        return club.mi_upper_bound(projected, features), q_nll

    def _train_q(self, club: CLUB, x: Tensor, y: Tensor) -> Tensor:
        optimizer = self._q_optimizers.get(id(club))
        if optimizer is None:
            optimizer = self._q_optimizers[id(club)] = torch.optim.Adam(club.parameters(), lr=self.q_lr)
        club.requires_grad_(True)
        try:
            with torch.enable_grad():
                for _ in range(self.q_steps):
                    optimizer.zero_grad(set_to_none=True)
                    club.learning_loss(x, y).backward()
                    optimizer.step()
        finally:
            optimizer.zero_grad(set_to_none=True)
            club.requires_grad_(False)
        with torch.no_grad():
            return club.learning_loss(x, y)


@dataclass
class OutlierBank:
    """A teacher and its boundary outliers, computed once; builds a fresh :class:`OALObjective` per network.

    Attributes:
        teacher: the teacher network (eval mode, no gradient).
        outliers: ``[L, D]`` boundary outliers in the teacher's normalised feature space.
        options: keyword arguments of :class:`OALObjective` (weights, q steps, sizes, extra source).
    """

    teacher: nn.Module
    outliers: Tensor
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_real(
        cls,
        teacher: nn.Module,
        real_images: Tensor,
        real_labels: Tensor,
        *,
        num_classes: int,
        generator: torch.Generator,
        per_class: int = DEFAULT_PER_CLASS,
        k: int = DEFAULT_K,
        num_anchors: int = DEFAULT_NUM_ANCHORS,
        samples_per_anchor: int = DEFAULT_SAMPLES_PER_ANCHOR,
        keep: int = DEFAULT_KEEP,
        sigma: float = DEFAULT_SIGMA,
        batch_size: int = 512,
        recipe: str = "fastdd",
        **options: Any,
    ) -> OutlierBank:
        """Teacher features of up to ``per_class`` real images of each class ``0 .. num_classes - 1`` (drawn with
        ``generator``; labels outside that range are not in-distribution and are skipped), then
        :func:`boundary_outliers` of them (same ``generator``).

        Args:
            teacher: see :class:`OALObjective`.
            real_images: ``[N, C, H, W]`` real training images in model space (any device).
            real_labels: ``[N]`` int64.
            num_classes: the in-distribution classes.
            generator: source of the image sample and of the Gaussian candidates.
            per_class, k, num_anchors, samples_per_anchor, keep, sigma: the outlier search
                (:mod:`fastdd.trust.boundary_outliers`; 1,000 per class as in NPOS/OAL).
            batch_size: images per teacher forward pass.
            recipe: ``"fastdd"`` (one search over all classes' features, as above) or ``"authors"``: the search of
                :func:`~fastdd.trust.boundary_outliers.per_class_boundary_outliers`, class by class, with the
                authors' settings (``AUTHORS_*``: k 300, 50 anchors, 1,500 candidates each, 2 kept, 1,000 outliers
                per class, ``sigma``), ignoring ``k``, ``num_anchors``, ``samples_per_anchor`` and ``keep``; the
                objectives it builds use the authors' recipe too.
            options: stored for :meth:`objective` (:class:`OALObjective` keyword arguments).
        """
        if real_images.shape[0] != real_labels.shape[0]:
            raise ValueError(
                f"real_images {tuple(real_images.shape)} and real_labels {tuple(real_labels.shape)} differ in length"
            )
        picks = []
        labels = real_labels.cpu()
        for c in range(num_classes):
            members = (labels == c).nonzero().squeeze(1)
            order = torch.randperm(members.numel(), generator=generator, device=generator.device).cpu()
            picks.append(members[order[:per_class]])
        index = torch.cat(picks)
        if index.numel() < 2:
            raise ValueError(f"OAL needs at least 2 real images of classes below {num_classes}, got {index.numel()}")
        device = next(teacher.parameters()).device
        with torch.no_grad():
            features = torch.cat([
                teacher.embed(real_images[index[i : i + batch_size].to(real_images.device)].to(device)).float()
                for i in range(0, index.numel(), batch_size)
            ])
        if recipe == "authors":
            outliers = per_class_boundary_outliers(
                features, labels[index].to(features.device), num_classes=num_classes, generator=generator,
                count=AUTHORS_OUTLIERS_PER_CLASS, k=AUTHORS_K, num_anchors=AUTHORS_NUM_ANCHORS,
                samples_per_anchor=AUTHORS_SAMPLES_PER_ANCHOR, keep=AUTHORS_KEEP, sigma=sigma,
            )
        else:
            outliers = boundary_outliers(
                features, generator=generator, k=k, num_anchors=num_anchors, samples_per_anchor=samples_per_anchor,
                keep=keep, sigma=sigma,
            )
        return cls(teacher, outliers, {**options, "recipe": recipe})

    def objective(
        self, net: nn.Module | None = None, *, generator: torch.Generator, student_dim: int | None = None
    ) -> OALObjective:
        """A fresh :class:`OALObjective` for the student ``net`` (its ``feature_dim`` and device), or for a student of
        ``student_dim`` features on the teacher's device; phi, proj and q are initialised from ``generator``."""
        if net is not None:
            student_dim = int(net.feature_dim)
            device = next(net.parameters()).device
        else:
            device = next(self.teacher.parameters()).device
            student_dim = student_dim if student_dim is not None else int(self.teacher.feature_dim)
        objective = OALObjective(
            self.teacher, self.outliers, student_dim=student_dim, generator=generator, **self.options
        )
        return objective.to(device)


def oal_objective(
    teacher: nn.Module,
    real_images: Tensor,
    real_labels: Tensor,
    *,
    num_classes: int,
    generator: torch.Generator,
    per_class: int = DEFAULT_PER_CLASS,
    student_dim: int | None = None,
    **options: Any,
) -> OALObjective:
    """:meth:`OutlierBank.from_real` then :meth:`OutlierBank.objective` in one call (``student_dim`` defaults to the
    teacher's feature size: the same architecture). ``options`` are the outlier-search arguments of ``from_real``
    (``k``, ``num_anchors``, ``samples_per_anchor``, ``keep``, ``sigma``, ``batch_size``) and the keyword arguments
    of :class:`OALObjective`."""
    bank = OutlierBank.from_real(
        teacher, real_images, real_labels, num_classes=num_classes, generator=generator, per_class=per_class,
        **options,
    )
    return bank.objective(generator=generator, student_dim=student_dim)


__all__ = [
    "DEFAULT_A1",
    "DEFAULT_A2",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "DEFAULT_PER_CLASS",
    "DEFAULT_Q_LR",
    "DEFAULT_Q_STEPS",
    "ExtraOutlierSource",
    "OALObjective",
    "OutlierBank",
    "head_of",
    "logits_and_features",
    "oal_objective",
]
