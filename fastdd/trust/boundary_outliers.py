"""Boundary outliers in a feature space (NPOS style, OAL's variant): Gaussian samples around the ID points that lie
farthest from their neighbours, kept where they are far from every ID point.

Recipe (all distances Euclidean, between L2-normalised vectors):

1. Normalise the ID features ``z_i`` to unit length.
2. Rank every ID point by its distance to its ``k``-th nearest neighbour among the *other* ID points; the
   ``num_anchors`` largest are the boundary anchors.
3. Around each anchor draw ``samples_per_anchor`` candidates ``anchor + sigma * N(0, I)``.
4. Normalise each candidate (for the search only) and keep, per anchor, the ``keep`` candidates whose ``k``-th
   nearest ID point is farthest. The kept candidates are returned as drawn (not normalised).

Two differences from NPOS's reference code. Its index contains the query points themselves, so a point's first
"neighbour" is itself at distance 0; here the self-distance is dropped, so ``k`` counts other points. And its
per-anchor selection reshapes the candidate distances as ``[samples, anchors]`` although the candidates are laid out
anchor-major, so with more than one anchor it compares candidates of different anchors; here the top-``keep`` is
taken within each anchor's own candidates.

Defaults: ``k = 300`` (NPOS, with 1,000 features per class), 200 anchors, 600 candidates per anchor and 2 kept per
anchor (NPOS's ``sample_from`` and ``ID_points_num``), ``sigma = 0.07`` (OAL's variant; NPOS uses 0.1). ``k`` is
clamped to ``n - 1`` for small sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdd.ops import nearest_synthetic

DEFAULT_K = 300
DEFAULT_NUM_ANCHORS = 200
DEFAULT_SAMPLES_PER_ANCHOR = 600
DEFAULT_KEEP = 2
DEFAULT_SIGMA = 0.07

# A chunk of the distance matrix holds about this many entries (16 MB in float32).
_DISTANCE_BLOCK_ELEMENTS = 1 << 22
# Candidates of several anchors are searched together while they hold about this many numbers (64 MB in float32).
_CANDIDATE_BLOCK_ELEMENTS = 1 << 24


@torch.no_grad()
def knn_distances(
    queries: Tensor, bank: Tensor, k: int, *, exclude_self: bool = False, chunk: int | None = None
) -> Tensor:
    """Distance from every query to its ``k``-th nearest row of ``bank`` (Euclidean; no gradient).

    ``k = 1`` without ``exclude_self`` is :func:`fastdd.ops.nearest_synthetic` (exact squared distances, compiled
    kernel), square-rooted. That op returns only the first neighbour and cannot skip a query's own row, so the other
    cases compare a chunk of queries with the whole bank by ``torch.cdist`` (which uses the matrix-product expansion
    for large inputs: fast, and accurate enough to rank neighbours at the distances that matter here) and take the
    ``k``-th smallest per row with ``topk``. At most one ``[chunk, n]`` distance matrix exists at a time.

    Args:
        queries: ``[m, D]`` floating point.
        bank: ``[n, D]``, same dtype and device.
        k: which neighbour, ``1 <= k <= n`` (``<= n - 1`` with ``exclude_self``).
        exclude_self: the queries are the bank itself (``queries[i]`` is ``bank[i]``, ``m == n``): the distance of
            each row to itself is dropped, so ``k`` counts the other rows (duplicates of a row still count).
        chunk: queries per chunk; None picks it so a chunk's distance matrix has about 4M entries.

    Returns:
        ``[m]`` distances in the inputs' dtype.
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"knn_distances expects queries [m, D] and bank [n, D], got {tuple(queries.shape)} and {tuple(bank.shape)}"
        )
    if not queries.is_floating_point() or queries.dtype != bank.dtype:
        raise TypeError(
            f"knn_distances expects floating-point tensors of one dtype, got {queries.dtype} and {bank.dtype}"
        )
    m, n = queries.shape[0], bank.shape[0]
    if exclude_self and m != n:
        raise ValueError(f"knn_distances: exclude_self needs the queries to be the bank, got m = {m} and n = {n}")
    available = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= available:
        raise ValueError(f"knn_distances expects 1 <= k <= {available} (bank of {n} rows"
                         f"{', self excluded' if exclude_self else ''}), got {k!r}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"knn_distances expects chunk >= 1, got {chunk}")
    if m == 0:
        return queries.new_empty(0)
    if k == 1 and not exclude_self:
        _, sq_dist = nearest_synthetic(queries.contiguous(), bank.contiguous())
        return sq_dist.clamp_min(0).sqrt()
    rows = chunk or max(1, _DISTANCE_BLOCK_ELEMENTS // n)
    out = queries.new_empty(m)
    for start in range(0, m, rows):
        block = queries[start : start + rows]
        dist = torch.cdist(block, bank)
        if exclude_self:
            local = torch.arange(block.shape[0], device=dist.device)
            dist[local, start + local] = float("inf")
        out[start : start + block.shape[0]] = _kth_smallest(dist, k)
    return out


def _kth_smallest(rows: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest value of every row; from the top (the ``(n - k + 1)``-th largest) when ``k`` is past
    the middle, where ``topk`` is several times faster (the same order statistic, so the same value)."""
    n = rows.shape[1]
    if k > n // 2 + 1:
        return rows.topk(n - k + 1, dim=1, largest=True).values[:, -1]
    return rows.topk(k, dim=1, largest=False).values[:, -1]


def _normalized(features: Tensor, name: str) -> Tensor:
    if features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"{name} expects floating-point features [n, D], got {tuple(features.shape)} {features.dtype}")
    if features.shape[0] < 2:
        raise ValueError(
            f"{name} needs at least 2 feature rows to measure neighbour distances, got {features.shape[0]}"
        )
    return F.normalize(features.detach(), dim=1)


def boundary_anchor_indices(
    features: Tensor, *, k: int = DEFAULT_K, num_anchors: int = DEFAULT_NUM_ANCHORS, chunk: int | None = None
) -> Tensor:
    """The ID points with the largest ``k``-NN distance (self excluded) after L2 normalisation: the boundary anchors.

    Args:
        features: ``[n, D]`` ID features, ``n >= 2`` (normalised here).
        k: neighbour rank; clamped to ``n - 1``.
        num_anchors: how many anchors; clamped to ``n``.
        chunk: passed to :func:`knn_distances`.

    Returns:
        ``[min(num_anchors, n)]`` int64 row indices, by decreasing k-NN distance.
    """
    normed = _normalized(features, "boundary_anchor_indices")
    if k < 1 or num_anchors < 1:
        raise ValueError(f"boundary_anchor_indices expects k >= 1 and num_anchors >= 1, got {k} and {num_anchors}")
    n = normed.shape[0]
    distance = knn_distances(normed, normed, min(k, n - 1), exclude_self=True, chunk=chunk)
    return distance.topk(min(num_anchors, n)).indices


@torch.no_grad()
def boundary_outliers(
    features: Tensor,
    *,
    generator: torch.Generator,
    k: int = DEFAULT_K,
    num_anchors: int = DEFAULT_NUM_ANCHORS,
    samples_per_anchor: int = DEFAULT_SAMPLES_PER_ANCHOR,
    keep: int = DEFAULT_KEEP,
    sigma: float = DEFAULT_SIGMA,
    chunk: int | None = None,
) -> Tensor:
    """Outlier features near the boundary of the ID features (see the module docstring for the recipe).

    Draws: for each anchor in the order of :func:`boundary_anchor_indices` (decreasing k-NN distance), its
    candidates are ``anchor + sigma * torch.randn(samples_per_anchor, D, generator=generator)`` (drawn on the
    generator's device, in the features' dtype), where ``anchor`` is the normalised feature row. Nothing else is
    drawn.

    Args:
        features: ``[n, D]`` ID features (e.g. a teacher's penultimate features), ``n >= 2``.
        generator: source of the Gaussian candidates.
        k: neighbour rank for both the anchors and the candidates; clamped to ``n - 1``.
        num_anchors: boundary anchors; clamped to ``n``.
        samples_per_anchor: candidates drawn per anchor.
        keep: candidates kept per anchor, ``1 <= keep <= samples_per_anchor``.
        sigma: standard deviation of the candidates around their anchor (in normalised feature space).
        chunk: passed to :func:`knn_distances`.

    Returns:
        ``[A * keep, D]`` with ``A = min(num_anchors, n)``, anchor-major: rows ``a * keep`` to ``a * keep + keep - 1``
        come from anchor ``a``, farthest first. On the features' device and dtype, without gradient.
    """
    if samples_per_anchor < 1 or not 1 <= keep <= samples_per_anchor:
        raise ValueError(f"boundary_outliers expects 1 <= keep <= samples_per_anchor, got keep = {keep} and "
                         f"samples_per_anchor = {samples_per_anchor}")
    if not sigma > 0:
        raise ValueError(f"boundary_outliers expects sigma > 0, got {sigma}")
    normed = _normalized(features, "boundary_outliers")
    n, dim = normed.shape
    k = min(k, n - 1)
    anchors = normed[boundary_anchor_indices(normed, k=k, num_anchors=num_anchors, chunk=chunk)]
    per_block = max(1, _CANDIDATE_BLOCK_ELEMENTS // (samples_per_anchor * dim))
    kept = []
    for start in range(0, anchors.shape[0], per_block):
        block = anchors[start : start + per_block]
        noise = torch.stack([
            torch.randn(samples_per_anchor, dim, generator=generator, device=generator.device, dtype=normed.dtype)
            for _ in range(block.shape[0])
        ]).to(normed.device)
        candidates = block[:, None, :] + sigma * noise  # [a, S, D]
        flat = F.normalize(candidates.reshape(-1, dim), dim=1)
        distance = knn_distances(flat, normed, k, chunk=chunk).view(block.shape[0], samples_per_anchor)
        best = distance.topk(keep, dim=1).indices  # per anchor, farthest first
        kept.append(candidates.gather(1, best[:, :, None].expand(-1, -1, dim)).reshape(-1, dim))
    return torch.cat(kept)


def per_class_boundary_outliers(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    generator: torch.Generator,
    count: int,
    k: int = DEFAULT_K,
    num_anchors: int = DEFAULT_NUM_ANCHORS,
    samples_per_anchor: int = DEFAULT_SAMPLES_PER_ANCHOR,
    keep: int = DEFAULT_KEEP,
    sigma: float = DEFAULT_SIGMA,
) -> Tensor:
    """OAL's authors' per-class outliers: for each class, :func:`boundary_outliers` of that class's features alone,
    repeated (fresh candidates around the same anchors) until ``count`` are found, then scaled by the norm of the
    class's mean feature, so that they lie at the scale of the features rather than on the unit sphere (their code
    multiplies each class's outliers by the norm of a class anchor; the class mean is our reading of it).

    Args:
        features: ``[n, D]`` ID features; labels: ``[n]`` their classes.
        num_classes: classes ``0 .. num_classes - 1`` (each needs at least 2 features).
        generator: source of every candidate, class by class in order.
        count: outliers per class.
        k, num_anchors, samples_per_anchor, keep, sigma: as :func:`boundary_outliers`, per class.

    Returns:
        ``[num_classes * count, D]``, class-major.
    """
    if count < 1:
        raise ValueError(f"per_class_boundary_outliers expects count >= 1, got {count}")
    out = []
    for c in range(num_classes):
        members = features[labels == c]
        if members.shape[0] < 2:
            raise ValueError(f"per_class_boundary_outliers needs at least 2 features of class {c}, got "
                             f"{members.shape[0]}")
        per_round = min(num_anchors, members.shape[0]) * keep
        rounds = -(-count // per_round)
        found = torch.cat([
            boundary_outliers(members, generator=generator, k=k, num_anchors=num_anchors,
                              samples_per_anchor=samples_per_anchor, keep=keep, sigma=sigma)
            for _ in range(rounds)
        ])[:count]
        out.append(found * members.mean(dim=0).norm())
    return torch.cat(out)


__all__ = [
    "DEFAULT_K",
    "DEFAULT_KEEP",
    "DEFAULT_NUM_ANCHORS",
    "DEFAULT_SAMPLES_PER_ANCHOR",
    "DEFAULT_SIGMA",
    "boundary_anchor_indices",
    "boundary_outliers",
    "knn_distances",
    "per_class_boundary_outliers",
]
