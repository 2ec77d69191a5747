"""Where TrustDD's real-side outliers T_out come from: outlier exposure (OE) or pseudo-outliers (POE).

- ``"oe"``: images of another source (a registered dataset or a folder), conformed to the dataset's shape.
- ``"poe"``: the dataset's own training images, each corrupted by one of jigsaw, invert, mosaic or speckle.
- ``"none"``: no outliers (plain distillation).

:func:`outlier_source` builds the sampler for a mode; :meth:`OutlierSource.sample` returns model-space images ready
for the integrated loss (:mod:`fastdd.trust.outlier_loss`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from fastdd.config.trust import OUTLIER_MODES
from fastdd.data.corruptions import POE_CORRUPTIONS
from fastdd.data.dataset import ImageDataset
from fastdd.data.foreign import load_foreign_images
from fastdd.errors import FastddError

POE_KINDS = tuple(POE_CORRUPTIONS)
ASSIGNMENTS = ("cycle", "sample")


def pseudo_outliers(
    unit_images: torch.Tensor,
    *,
    generator: torch.Generator,
    kinds: Sequence[str] = POE_KINDS,
    assignment: str = "cycle",
) -> torch.Tensor:
    """Corrupt every image with exactly one corruption of ``kinds`` (TrustDD's ensemble of corruptions).

    Args:
        unit_images: ``[N, C, H, W]`` float in [0, 1].
        generator: the only source of randomness (assignment and the corruptions' own draws).
        kinds: names in :data:`POE_KINDS`; a name may repeat to weight it.
        assignment: ``"cycle"``: image ``i`` gets ``kinds[i % len(kinds)]``; ``"sample"``: each image gets a kind
            drawn uniformly from ``generator``.

    Returns:
        ``[N, C, H, W]`` in [0, 1], image ``i`` the corruption of input ``i``; a new tensor.
    """
    if unit_images.dim() != 4 or not unit_images.is_floating_point():
        raise ValueError(
            f"pseudo_outliers expects [N, C, H, W] float images, got shape {tuple(unit_images.shape)} "
            f"dtype {unit_images.dtype}"
        )
    kinds = _check_kinds(kinds)
    if assignment == "cycle":
        kind_of_image = torch.arange(unit_images.shape[0]) % len(kinds)
    elif assignment == "sample":
        kind_of_image = torch.randint(
            len(kinds), (unit_images.shape[0],), generator=generator, device=generator.device
        ).cpu()
    else:
        raise FastddError(f"unknown outlier assignment {assignment!r}; choose one of {', '.join(ASSIGNMENTS)}.")
    out = torch.empty_like(unit_images)
    for position, kind in enumerate(kinds):
        members = (kind_of_image == position).nonzero().flatten().to(unit_images.device)
        if members.numel():
            out[members] = POE_CORRUPTIONS[kind](unit_images[members], generator=generator)
    return out


class OutlierSource:
    """Draws real-side outliers in a dataset's model space, for the expert/teacher side of TrustDD.

    Args:
        mode: ``"oe"`` (images of ``outlier_data``) or ``"poe"`` (corrupted training images of ``dataset``).
        dataset: the in-distribution dataset; outliers take its shape and normalisation.
        outlier_data: for ``"oe"``: a registered dataset name or a folder of images (its ``train`` split is used).
        data_root: data folder of a registered ``outlier_data``.

    Attributes:
        mode, dataset, outlier_data, data_root: as given.
        kinds, assignment: the POE corruption names and their assignment (``"cycle"``).
    """

    def __init__(
        self,
        mode: str,
        dataset: ImageDataset,
        *,
        outlier_data: str | None = None,
        data_root: str | None = None,
    ) -> None:
        _check_mode(mode, outlier_data)
        if mode == "none":
            raise FastddError("outlier mode 'none' draws no outliers; use outlier_source(), which returns None for it.")
        self.mode = mode
        self.dataset = dataset
        self.outlier_data = outlier_data
        self.data_root = data_root
        self.kinds = POE_KINDS
        self.assignment = "cycle"
        self._pool: torch.Tensor | None = None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` outliers (distinct sources when ``n`` does not exceed what is available).

        ``"poe"``: random training images of any class, each corrupted by one POE kind (cycling in draw order).
        ``"oe"``: random members of the outlier pool, which is loaded and normalised on the first call.

        Args:
            n: number of outliers, ``>= 0``.
            generator: the only source of randomness.

        Returns:
            ``[n, C, H, W]`` float32 in the dataset's model space, on the CPU.
        """
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"cannot sample {n} outliers")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if self.mode == "oe":
            pool = self.pool()
            return pool[_draw(pool.shape[0], n, generator)]
        train = self.dataset.train_images
        unit = self.dataset.to_unit_range(train[_draw(train.shape[0], n, generator).to(train.device)])
        corrupted = pseudo_outliers(unit, generator=generator, kinds=self.kinds, assignment=self.assignment)
        return self.dataset.to_model_space(corrupted).to("cpu", torch.float32)

    def pool(self) -> torch.Tensor:
        """The OE pool: ``[P, C, H, W]`` float32 model-space images of ``outlier_data`` (loaded once, cached)."""
        if self.mode != "oe":
            raise ValueError(f"only outlier mode 'oe' has a pool, this source is {self.mode!r}")
        if self._pool is None:
            unit = load_foreign_images(self.outlier_data, like=self.dataset, split="train", data_root=self.data_root)
            self._pool = self.dataset.to_model_space(unit).to("cpu", torch.float32)
        return self._pool

    def describe(self) -> dict:
        """A JSON-able summary, e.g. ``{"mode": "poe", "kinds": [...], "assignment": "cycle"}``."""
        if self.mode == "poe":
            return {"mode": "poe", "kinds": list(self.kinds), "assignment": self.assignment}
        return {"mode": "oe", "source": self.outlier_data, "pool": int(self.pool().shape[0])}

    def __repr__(self) -> str:
        detail = f"outlier_data={self.outlier_data!r}" if self.mode == "oe" else f"kinds={list(self.kinds)}"
        return f"OutlierSource(mode={self.mode!r}, dataset={self.dataset.name!r}, {detail})"


def outlier_source(
    mode: str,
    dataset: ImageDataset,
    *,
    outlier_data: str | None = None,
    data_root: str | None = None,
) -> OutlierSource | None:
    """The outlier sampler of ``mode`` for ``dataset``, or None for ``"none"``.

    Raises:
        FastddError: unknown mode, ``"oe"`` without ``outlier_data``, or ``outlier_data`` with another mode.
    """
    _check_mode(mode, outlier_data)
    if mode == "none":
        return None
    return OutlierSource(mode, dataset, outlier_data=outlier_data, data_root=data_root)


def _check_mode(mode: str, outlier_data: str | None) -> None:
    if mode not in OUTLIER_MODES:
        raise FastddError(f"unknown outlier mode {mode!r}; choose one of {', '.join(OUTLIER_MODES)}.")
    if mode == "oe" and outlier_data is None:
        raise FastddError("outlier mode 'oe' needs outlier data: a registered dataset name or a folder of images.")
    if mode != "oe" and outlier_data is not None:
        raise FastddError(
            f"outlier data {outlier_data!r} is only used by outlier mode 'oe', not {mode!r}; drop it or use 'oe'."
        )


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if not kinds:
        raise FastddError(f"at least one pseudo-outlier kind is needed; choose from {', '.join(POE_KINDS)}.")
    unknown = [kind for kind in kinds if kind not in POE_CORRUPTIONS]
    if unknown:
        raise FastddError(f"unknown pseudo-outlier kinds {unknown}; choose from {', '.join(POE_KINDS)}.")
    return kinds


def _draw(available: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` random indices into ``available`` items: distinct when ``n <= available``, else with replacement."""
    if available == 0:
        raise FastddError("the outlier pool is empty; give outlier data that holds images.")
    if n <= available:
        return torch.randperm(available, generator=generator, device=generator.device)[:n].cpu()
    return torch.randint(available, (n,), generator=generator, device=generator.device).cpu()
