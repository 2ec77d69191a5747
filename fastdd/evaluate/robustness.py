"""Robustness of networks trained on a synthetic set: accuracy on the worst test subgroup and on shifted test images.

The five measures of the Group-DRO dataset-distillation evaluation, each an accuracy in percent:

* ``cluster_min`` / ``cluster_mean``: the test images are split by KMeans (10 clusters, ``random_state=0``) on their
  flattened model-space pixels; the accuracy of the clean predictions is taken within each cluster, and the worst
  cluster (``cluster_min``) and the unweighted mean over clusters (``cluster_mean``) are reported. ``cluster_mean``
  weighs every cluster alike, so it differs from the plain accuracy when the clusters differ in size;
* ``noise``: accuracy on ``clamp(x + N(0, 0.005), 0, 1)``;
* ``blur``: accuracy on the images blurred by a Gaussian of radius (standard deviation) 2 pixels;
* ``invert``: accuracy on ``1 - x``, all channels.

Corruptions act on [0, 1] pixels: a test image is mapped back with `ImageDataset.to_unit_range` (de-normalised, or
un-whitened for ZCA datasets), corrupted, and mapped into model space again. Clusters and corrupted images depend only
on the test set and the evaluation seed, so `build_robustness_tests` makes them once per evaluation and every network
is scored against the same ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fastdd.data import ImageDataset
from fastdd.data.corruptions import gaussian_blur, gaussian_noise, invert_all
from fastdd.errors import FastddError
from fastdd.training import predict_logits

CLUSTER_SETS = ("cluster_min", "cluster_mean")
CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "noise": gaussian_noise,
    "blur": gaussian_blur,
    "invert": invert_all,
}
ROBUSTNESS_SETS = (*CLUSTER_SETS, *CORRUPTIONS)
NUM_CLUSTERS = 10
CLUSTER_RANDOM_STATE = 0
# Ten k-means++ starts, the best kept: the partition is the lowest-inertia one of ten rather than of one, and the
# explicit value does not follow scikit-learn's change of default (10 before 1.4, one start for k-means++ after).
KMEANS_N_INIT = 10

# test images tensor (by identity) -> {(num_clusters, random_state, tensor version): [M] cluster ids}; an entry goes
# when its tensor does.
_cluster_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()


def parse_robustness_sets(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Parse ``"noise,blur"`` (or a list of such strings) into robustness set names.

    Args:
        text: comma-separated names from ``ROBUSTNESS_SETS``, a list of them, or None for all of them.
    Returns:
        The chosen names in the order of ``ROBUSTNESS_SETS`` (the column order of every table). Raises
        ``FastddError`` for an unknown or repeated name, or when no name is given.
    """
    if text is None:
        return ROBUSTNESS_SETS
    items = [text] if isinstance(text, str) else list(text)
    names = [part.strip().lower().replace("-", "_") for item in items for part in item.split(",") if part.strip()]
    if not names:
        raise FastddError(f"no robustness set was named; choose from {', '.join(ROBUSTNESS_SETS)}.")
    for name in names:
        if name not in ROBUSTNESS_SETS:
            raise FastddError(f"unknown robustness set {name!r}; choose from {', '.join(ROBUSTNESS_SETS)}.")
    if len(set(names)) != len(names):
        repeated = next(name for name in names if names.count(name) > 1)
        raise FastddError(f"the robustness set {repeated!r} is listed twice; name each set once.")
    return tuple(name for name in ROBUSTNESS_SETS if name in names)


def kmeans_clusters(
    images: torch.Tensor, *, num_clusters: int = NUM_CLUSTERS, random_state: int = CLUSTER_RANDOM_STATE
) -> torch.Tensor:
    """KMeans cluster of every image, on its flattened pixels as given (model space for test images).

    scikit-learn's ``KMeans(num_clusters, n_init=10, random_state=random_state)`` on float32 features. The result is
    deterministic, and cached for the lifetime of ``images`` (as long as it is not modified in place): it takes about
    25 s on the 10,000 Fashion-MNIST test images on two busy cores.

    Args:
        images: ``[M, C, H, W]`` float (any trailing shape; each row is flattened).
        num_clusters: number of clusters ``G``, at most ``M``.
        random_state: seed of KMeans' own initialisation.
    Returns:
        ``[M]`` int64 cluster ids in ``[0, G)`` on the CPU.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be at least 1, got {num_clusters}")
    check_cluster_count(images.shape[0], num_clusters)
    key = (num_clusters, random_state, images._version)
    cached = _cluster_cache.setdefault(images, {})
    if key not in cached:
        from sklearn.cluster import KMeans

        features = images.detach().reshape(images.shape[0], -1).to("cpu", torch.float32).numpy()
        kmeans = KMeans(n_clusters=num_clusters, n_init=KMEANS_N_INIT, random_state=random_state)
        cached[key] = torch.from_numpy(kmeans.fit_predict(features)).to(torch.int64)
    return cached[key]


def check_cluster_count(num_images: int, num_clusters: int = NUM_CLUSTERS) -> None:
    """Refuse the cluster measures on a test set of fewer than ``num_clusters`` images (before any clustering).

    Raises:
        FastddError: saying which measures to drop.
    """
    if num_images < num_clusters:
        raise FastddError(
            f"the test set has {num_images} images, fewer than the {num_clusters} clusters of cluster_min; "
            "drop cluster_min and cluster_mean from --robustness-sets."
        )


def test_clusters(
    dataset: ImageDataset, *, num_clusters: int = NUM_CLUSTERS, random_state: int = CLUSTER_RANDOM_STATE
) -> torch.Tensor:
    """`kmeans_clusters` of ``dataset.test_images`` (model space): ``[M]`` int64 ids in ``[0, num_clusters)``."""
    return kmeans_clusters(dataset.test_images, num_clusters=num_clusters, random_state=random_state)


# Not a pytest test, despite the name.
test_clusters.__test__ = False


def cluster_accuracies(
    predictions: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor, num_clusters: int
) -> torch.Tensor:
    """Accuracy (fraction in [0, 1]) within each cluster.

    Args:
        predictions: ``[M]`` predicted classes.
        labels: ``[M]`` true classes.
        clusters: ``[M]`` int64 cluster ids in ``[0, G)``.
        num_clusters: ``G``.
    Returns:
        ``[G]`` float64; NaN for a cluster without images (leave it out of a min or mean with ``nanmin``/``nanmean``,
        as `robustness_row` does).
    """
    if not predictions.shape == labels.shape == clusters.shape or predictions.dim() != 1:
        raise ValueError(
            "cluster_accuracies expects predictions, labels and clusters of one shape [M], got "
            f"{tuple(predictions.shape)}, {tuple(labels.shape)} and {tuple(clusters.shape)}"
        )
    clusters = clusters.to(torch.int64).cpu()
    if clusters.numel() and not 0 <= int(clusters.min()) <= int(clusters.max()) < num_clusters:
        raise ValueError(f"cluster ids must lie in [0, {num_clusters}), got [{clusters.min()}, {clusters.max()}]")
    correct = (predictions.cpu() == labels.cpu()).to(torch.float64)
    hits = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, clusters, correct)
    sizes = torch.bincount(clusters, minlength=num_clusters).to(torch.float64)
    return torch.where(sizes > 0, hits / sizes.clamp_min(1), torch.nan)


def corrupt_images(
    dataset: ImageDataset, images: torch.Tensor, name: str, *, generator: torch.Generator
) -> torch.Tensor:
    """Apply the corruption ``name`` (``"noise"``, ``"blur"`` or ``"invert"``) to model-space images of ``dataset``.

    The images go to [0, 1] pixels (`ImageDataset.to_unit_range`), through the corruption, and back
    (`ImageDataset.to_model_space`).

    Args:
        dataset: gives the input transform (normalisation or ZCA).
        images: ``[M, C, H, W]`` float in ``dataset``'s model space.
        name: a key of ``CORRUPTIONS``.
        generator: the only source of randomness (the noise).
    Returns:
        ``[M, C, H, W]`` float in model space, on ``images``' device.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    unit = dataset.to_unit_range(images)
    return dataset.to_model_space(CORRUPTIONS[name](unit, generator=generator))


def corrupted_test_images(dataset: ImageDataset, name: str, *, generator: torch.Generator) -> torch.Tensor:
    """`corrupt_images` of ``dataset.test_images``: ``[M, C, H, W]`` float in model space."""
    return corrupt_images(dataset, dataset.test_images, name, generator=generator)


@dataclass
class RobustnessTests:
    """Everything the robustness measures compare a network's predictions with, built once per evaluation.

    Attributes:
        sets: the measures, in the order of ``ROBUSTNESS_SETS``.
        labels: ``[M]`` test labels.
        clusters: ``[M]`` int64 KMeans cluster of each clean test image, or None without a cluster set.
        num_clusters: ``G``.
        corrupted: corruption name -> ``[M, C, H, W]`` corrupted test images in model space, for the chosen ones.
    """

    sets: tuple[str, ...]
    labels: torch.Tensor
    clusters: torch.Tensor | None
    num_clusters: int
    corrupted: dict[str, torch.Tensor]

    def cluster_sizes(self) -> list[int]:
        """Number of test images per cluster, ``G`` values (empty without a cluster set)."""
        if self.clusters is None:
            return []
        return torch.bincount(self.clusters, minlength=self.num_clusters).tolist()


def build_robustness_tests(
    dataset: ImageDataset,
    sets: tuple[str, ...] | list[str],
    *,
    seed: int,
    images: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    num_clusters: int = NUM_CLUSTERS,
) -> RobustnessTests:
    """Cluster the test images and corrupt them, for the chosen ``sets``.

    Each corruption draws from its own generator seeded by ``(seed, name)``, so its images do not depend on the other
    sets, their order, or any other randomness of the evaluation.

    Args:
        dataset: the real dataset (its input transform).
        sets: names from ``ROBUSTNESS_SETS`` (see `parse_robustness_sets`).
        seed: the evaluation seed.
        images: ``[M, C, H, W]`` model-space test images (default ``dataset.test_images``).
        labels: ``[M]`` their labels (default ``dataset.test_labels``).
        num_clusters: ``G`` of the cluster measures.
    Returns:
        The `RobustnessTests`.
    """
    sets = parse_robustness_sets(list(sets))
    if images is None:
        images, labels = dataset.test_images, dataset.test_labels
    elif labels is None or labels.shape != images.shape[:1]:
        raise ValueError("build_robustness_tests needs labels of shape [M] with images of shape [M, C, H, W]")
    clusters = None
    if any(name in CLUSTER_SETS for name in sets):
        clusters = kmeans_clusters(images, num_clusters=num_clusters)
    corrupted = {}
    for name in sets:
        if name in CORRUPTIONS:
            generator = torch.Generator()
            generator.manual_seed(zlib.crc32(f"{seed}/robustness/{name}".encode()))
            corrupted[name] = corrupt_images(dataset, images, name, generator=generator)
    return RobustnessTests(sets, labels, clusters, num_clusters, corrupted)


def robustness_row(
    net: torch.nn.Module, tests: RobustnessTests, *, clean_logits: torch.Tensor | None = None
) -> dict[str, float]:
    """The robustness measures of one trained network, in percent.

    Args:
        net: the network (put in eval mode).
        tests: from `build_robustness_tests`.
        clean_logits: ``[M, classes]`` logits of ``net`` on the clean test images, when already computed; needed for
            the cluster measures (None with a cluster set raises ``ValueError``).
    Returns:
        ``{set: accuracy in percent}`` for ``tests.sets``, see `robustness_scores`.
    """
    corrupted = {name: predict_logits(net, images) for name, images in tests.corrupted.items()}
    return robustness_scores(tests, clean_logits, corrupted)


def robustness_scores(
    tests: RobustnessTests, clean_logits: torch.Tensor | None, corrupted_logits: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The robustness measures of one network from its logits, in percent.

    Args:
        tests: from `build_robustness_tests`.
        clean_logits: ``[M, classes]`` logits on the clean test images; needed for the cluster measures (None with a
            cluster set raises ``ValueError``).
        corrupted_logits: corruption name -> ``[M, classes]`` logits on ``tests.corrupted[name]``, for each of them.
    Returns:
        ``{set: accuracy in percent}`` for ``tests.sets``. ``cluster_min``/``cluster_mean`` are the min/mean over the
        non-empty clusters.
    """
    row: dict[str, float] = {}
    if tests.clusters is not None:
        if clean_logits is None:
            raise ValueError("robustness_row needs clean_logits [M, classes] for the cluster measures")
        per_cluster = cluster_accuracies(
            clean_logits.argmax(dim=1), tests.labels, tests.clusters, tests.num_clusters
        )
        present = per_cluster[~per_cluster.isnan()]
        if "cluster_min" in tests.sets:
            row["cluster_min"] = 100.0 * float(present.min())
        if "cluster_mean" in tests.sets:
            row["cluster_mean"] = 100.0 * float(present.mean())
    for name in tests.corrupted:
        predictions = corrupted_logits[name].argmax(dim=1)
        row[name] = 100.0 * float((predictions.cpu() == tests.labels.cpu()).to(torch.float64).mean())
    return {name: row[name] for name in tests.sets}
