"""Group-robust distillation (paper 002): the network that supplies the matching signal trains on real images with
``CE + mean_g CVaR_alpha(g) + max_g CVaR_alpha(g)``, over clusters of real images formed around synthetic images.

Clusters: each sampled real image joins the nearest (squared Euclidean distance, in pixel space or in the current
network's embedding) of the cluster centres of its own class. The centres are the class's synthetic images when
there are at most ``k`` of them, else ``k`` of them picked by farthest-point selection (:func:`cluster_centres`);
``k`` defaults to the IPC up to 10 and to 10 above (:func:`default_clusters`). Centre ``j`` of class ``c`` is global
cluster ``c * k + j``, so every class owns ``k`` clusters of the ``num_classes * k``.

CVaR_alpha of a cluster is the mean of its ``ceil(alpha * n)`` largest losses (the upper tail), and, unlike the
authors' code, the term is part of the graph: it changes the network's gradient.

The heavy pieces are fused ops: :func:`fastdd.ops.nearest_synthetic` (class-restricted assignment) and
:func:`fastdd.ops.group_cvar_loss` (per-cluster tail selection, mean + max).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.config.trust import DEFAULT_CVAR_ALPHA
from fastdd.ops import group_cvar_loss, nearest_synthetic

MAX_DEFAULT_CLUSTERS = 10


def default_clusters(ipc: int) -> int:
    """Clusters per class when ``--clusters`` is not given: the IPC up to 10, else 10 (the paper's rule)."""
    return ipc if ipc <= MAX_DEFAULT_CLUSTERS else MAX_DEFAULT_CLUSTERS


def farthest_point_centres(points: Tensor, k: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``k`` distinct rows of ``points`` chosen by farthest-point selection.

    The first centre is row 0 (deterministic; the authors' code also starts there), or a uniformly random row when a
    ``generator`` is given. Each next centre is the row farthest (squared Euclidean distance) from the centres chosen
    so far; ties go to the lowest row. Rows already chosen are never chosen again, so duplicated points still give
    ``k`` distinct indices.

    Args:
        points: ``[n, D]`` floating point (no gradient is taken).
        k: number of centres, ``1 <= k <= n``.
        generator: optional source of a random first centre.

    Returns:
        ``[k]`` int64 row indices on ``points``' device, in the order they were chosen.
    """
    if points.dim() != 2 or not points.is_floating_point():
        raise ValueError(f"farthest_point_centres expects floating-point points [n, D], got {tuple(points.shape)} "
                         f"{points.dtype}")
    n = points.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"farthest_point_centres expects 1 <= k <= n = {n} (points {tuple(points.shape)}), got {k!r}")
    start = 0 if generator is None else int(torch.randint(n, (1,), generator=generator))
    chosen = [start]
    x = points.detach()
    with torch.no_grad():
        distance = (x - x[start]).square().sum(dim=1)
        distance[start] = float("-inf")
        for _ in range(1, k):
            nxt = int(distance.argmax())
            chosen.append(nxt)
            distance = torch.minimum(distance, (x - x[nxt]).square().sum(dim=1))
            distance[nxt] = float("-inf")
    return torch.tensor(chosen, dtype=torch.int64, device=points.device)


def cluster_centres(
    features: Tensor, labels: Tensor, num_classes: int, k: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """The cluster centres among the synthetic samples: ``k`` per class, class-major.

    A class with exactly ``k`` samples uses all of them in index order; a class with more uses
    :func:`farthest_point_centres` among its own samples.

    Args:
        features: ``[M, D]`` synthetic samples (flattened images or embeddings).
        labels: ``[M]`` int64 class of each sample, in ``[0, num_classes)``; every class needs at least ``k``.
        num_classes: C.
        k: centres per class.
        generator: passed to :func:`farthest_point_centres` (None: deterministic first centre).

    Returns:
        ``[C * k]`` int64 indices into ``features``: entry ``c * k + j`` is centre ``j`` of class ``c``, i.e. the
        sample that defines global cluster ``c * k + j``.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"cluster_centres expects features [M, D] and labels [M], got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    picks = []
    for c in range(num_classes):
        members = (labels == c).nonzero().squeeze(1)
        if members.numel() < k:
            raise ValueError(f"cluster_centres: class {c} has {members.numel()} synthetic samples, fewer than the "
                             f"{k} centres per class requested")
        if members.numel() == k:
            picks.append(members)
        else:
            picks.append(members[farthest_point_centres(features[members], k, generator=generator)])
    return torch.cat(picks)


def assign_clusters(
    real_features: Tensor, real_labels: Tensor, centre_features: Tensor, centre_labels: Tensor, *,
    within_class: bool = True,
) -> Tensor:
    """Cluster of every real sample: its nearest centre among the centres of its own class (``within_class``), or
    among all centres (the group-robust authors' code: ``--robust-assign all``).

    Args:
        real_features: ``[N, D]`` real samples, in the same space as the centres.
        real_labels: ``[N]`` int64 classes.
        centre_features: ``[K, D]`` centres, class-major with ``k`` per class as :func:`cluster_centres` orders
            them (``K = C * k``).
        centre_labels: ``[K]`` int64 class of each centre; every class in ``real_labels`` needs one.

    Returns:
        ``[N]`` int64 index of the nearest (same-class) centre (lowest index on ties) = the global cluster id in
        ``[0, K)``. No gradient.
    """
    groups = dict(point_groups=real_labels, center_groups=centre_labels) if within_class else {}
    with torch.no_grad():
        index, _ = nearest_synthetic(real_features.detach(), centre_features.detach(), **groups)
    return index


# alpha * n that is an integer up to rounding (0.3 * 10 = 2.9999999999999996) counts as that integer.
_TAIL_TOLERANCE = 1e-9
CVAR_TAILS = ("upper", "lower")


def lower_tail_size(count: int, alpha: float) -> int:
    """``int(alpha * count)`` (up to rounding), at least 1: how many of a cluster's smallest losses the authors'
    trimmed mean keeps."""
    return min(count, max(1, math.floor(alpha * count + _TAIL_TOLERANCE)))


def cluster_trimmed_mean(losses: Tensor, assign: Tensor, num_clusters: int, alpha: float) -> Tensor:
    """Per cluster, the mean of its :func:`lower_tail_size` smallest losses (the lower-tail CVaR of the group-robust
    authors' released code, differentiable here); 0 for an empty cluster.

    Args:
        losses: ``[N]`` floating-point per-sample losses.
        assign: ``[N]`` int64 cluster of each sample, in ``[0, num_clusters)``.
        num_clusters: G.
        alpha: level in (0, 1].
    Returns:
        ``[G]``; the gradient is ``1 / k_g`` on the kept losses of cluster ``g`` (the lower sample index first
        among equal losses), 0 elsewhere.
    """
    values = []
    for g in range(num_clusters):
        members = losses[assign == g]
        if members.numel() == 0:
            values.append(losses.new_zeros(()))
            continue
        kept = members.sort(stable=True).values[: lower_tail_size(members.numel(), alpha)]
        values.append(kept.mean())
    return torch.stack(values)


def robust_loss(
    logits: Tensor, targets: Tensor, assign: Tensor, num_clusters: int, alpha: float, *, tail: str = "upper"
) -> Tensor:
    """``CE.mean() + mean_g CVaR_alpha(CE of g) + max_g CVaR_alpha(CE of g)`` over the non-empty clusters; with
    ``tail="lower"`` the CVaR of a cluster is :func:`cluster_trimmed_mean` (the authors' form) instead of the upper
    tail of ``fastdd.ops.group_cvar_loss``.

    Args:
        logits: ``[N, num_classes]``.
        targets: ``[N]`` int64 labels.
        assign: ``[N]`` int64 cluster of each sample, in ``[0, num_clusters)``.
        num_clusters: G.
        alpha: CVaR level in (0, 1]: each cluster averages its ``ceil(alpha * n_g)`` largest losses.

    Returns:
        0-d tensor, differentiable w.r.t. ``logits`` through both terms.
    """
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    if tail == "upper":
        return per_sample.mean() + group_cvar_loss(per_sample, assign, num_clusters, alpha)
    if tail != "lower":
        raise ValueError(f"tail must be one of {', '.join(CVAR_TAILS)}, got {tail!r}")
    present = torch.bincount(assign, minlength=num_clusters) > 0
    cvar = cluster_trimmed_mean(per_sample, assign, num_clusters, alpha)[present]
    return per_sample.mean() + cvar.mean() + cvar.max()


def logits_and_embedding(net: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``net(x)`` and, when it can come from the same forward pass, ``net.embed(x)`` detached.

    fastdd's networks compute ``forward(x) = head(embed(x))`` with the head in ``classifier`` (ConvNet, AlexNet,
    VGG) or ``fc`` (ResNet). The features are shared only when they equal what ``embed`` gives in eval mode, i.e.
    the network has no batchnorm (whose train-mode output uses batch statistics); otherwise the second value is None.

    Args:
        net: the network (in train mode for a training step).
        x: ``[B, C, H, W]`` inputs.
    Returns:
        ``(logits [B, K] with graph, features [B, feature_dim] without graph or None)``.
    """
    head = getattr(net, "classifier", None) or getattr(net, "fc", None)
    has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if not isinstance(head, torch.nn.Module) or has_batchnorm or not hasattr(net, "embed"):
        return net(x), None
    features = net.embed(x)
    return head(features), features.detach()


@dataclass(frozen=True)
class RobustObjective:
    """The clustering and loss settings of one run (``--clusters``, ``--cvar-alpha``, ``--cluster-space``).

    Attributes:
        num_classes: C.
        clusters_per_class: k; the loss has ``C * k`` clusters.
        alpha: CVaR level.
        space: ``"pixel"`` (flattened model-space images) or ``"embed"`` (the network's ``embed()`` in eval mode,
            without gradient, at the moment of the assignment).
        tail: ``"upper"`` (fastdd's CVaR) or ``"lower"`` (the authors' trimmed mean), see :func:`robust_loss`.
        within_class: a real image joins the nearest centre of its own class (True) or of any class.
    """

    num_classes: int
    clusters_per_class: int
    alpha: float = DEFAULT_CVAR_ALPHA
    space: str = "embed"
    tail: str = "upper"
    within_class: bool = True

    @property
    def num_clusters(self) -> int:
        return self.num_classes * self.clusters_per_class

    def assign(
        self,
        net: torch.nn.Module,
        real: Tensor,
        real_labels: Tensor,
        synthetic: Tensor,
        synthetic_labels: Tensor,
        *,
        real_features: Tensor | None = None,
    ) -> Tensor:
        """Global cluster ids ``[N]`` of the real images ``[N, C, H, W]`` around the synthetic images
        ``[M, C, H, W]`` with labels ``synthetic_labels`` ``[M]``, in this objective's space.

        ``real_features`` ``[N, feature_dim]``: in embed space, the real images' embedding when the caller already
        has it (from :func:`logits_and_embedding`), which saves a forward pass; ignored in pixel space.
        """
        if self.space == "pixel":
            real_features, synthetic_features = real.detach().flatten(1), synthetic.detach().flatten(1)
        elif real_features is None:
            features = self._embed(net, torch.cat([real.detach(), synthetic.detach()]))
            real_features, synthetic_features = features.split([real.shape[0], synthetic.shape[0]])
        else:
            synthetic_features = self._embed(net, synthetic.detach())
        centres = cluster_centres(synthetic_features, synthetic_labels, self.num_classes, self.clusters_per_class)
        return assign_clusters(real_features, real_labels, synthetic_features[centres], synthetic_labels[centres],
                               within_class=self.within_class)

    def loss(self, logits: Tensor, targets: Tensor, assign: Tensor) -> Tensor:
        """:func:`robust_loss` with this objective's cluster count and alpha: logits ``[N, K]`` -> 0-d."""
        return robust_loss(logits, targets, assign, self.num_clusters, self.alpha, tail=self.tail)

    @staticmethod
    def _embed(net: torch.nn.Module, images: Tensor) -> Tensor:
        was_training = net.training
        net.eval()  # batchnorm: use, but do not update, the running statistics
        try:
            with torch.no_grad():
                return net.embed(images)
        finally:
            net.train(was_training)
