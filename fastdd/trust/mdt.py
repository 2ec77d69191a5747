"""Masked distillation training (MDT, paper 004) as a distiller plug-in."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fastdd.config import MDTConfig, pick
from fastdd.errors import FastddError
from fastdd.trust.masking import DEFAULT_MASK_PATCH, element_mask_like, mask_images, mask_like
from fastdd.trust.plugins import TrustPlugin

MaskSampler = Callable[[tuple[int, ...], torch.Generator, torch.device], Tensor]
"""``sampler(shape, generator, device) -> [N, 1, H, W]`` {0, 1} mask for a batch of ``shape`` ``[N, C, H, W]``."""


def mask_sampler(ratio: float, patch: int = DEFAULT_MASK_PATCH, unit: str = "pixel") -> MaskSampler | None:
    """MDT's masks as a :data:`MaskSampler` (:func:`fastdd.trust.masking.mask_like` at ``ratio``, ``[N, 1, H, W]``;
    with ``unit="element"`` :func:`~fastdd.trust.masking.element_mask_like`, ``[N, C, H, W]``), or None at ratio 0
    (no masking and no draws)."""
    if ratio == 0:
        return None

    def sample(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
        if unit == "element":
            return element_mask_like(shape, ratio, generator=generator, device=device)
        return mask_like(shape, ratio, generator=generator, patch=patch, device=device)

    return sample


class MaskedDistillation(TrustPlugin):
    """MDT: every synthetic minibatch that a network trained by the matching objective sees is multiplied by a fresh
    binary mask that zeroes ``round(mask_ratio * H * W)`` pixels of each image in all channels (a masked pixel is 0,
    the dataset mean), after augmentation; so the distilled data cannot concentrate all information in a few
    directions. At ratio 0 nothing is masked and nothing drawn.

    Per method:

    - dc/dsa: (a) in the gradient-matching loss, the augmented synthetic batch of each class (and S_out under
      TrustDD) just before its forward pass, so the gradient on masked S is matched to the gradient on unmasked real
      images (real images and real outliers are never masked); (b) in the inner loop, every augmented minibatch of
      S (and of S_out) before the network's forward pass. With ``net_data`` "real" there is no inner loop on S, so
      only (a) applies. The batchnorm statistics from real images are not masked.
    - mtt/tesla/tesla-compat: the student's input: at every student step the augmented synthetic minibatch (S_out
      rows included, under TrustDD) is masked, the mask drawn into the student plan after that step's augmentation
      and replayed by every mode, so the three modes train the same masked student. The soft labels
      (``soft_labels``) are the expert's outputs on the unmasked images.
    - dm: refused; its networks never train on the synthetic images.

    Attributes:
        config: the :class:`~fastdd.config.MDTConfig` section.
        ratio: the masking ratio (``mask_ratio``).
    """

    def __init__(self, config: MDTConfig, *, patch: int = DEFAULT_MASK_PATCH) -> None:
        self.config = config
        self.ratio = config.mask_ratio
        self.patch = patch

    @classmethod
    def from_config(cls, config: Any, dataset: Any, *, method: str, trains_on_synthetic: bool,
                    **_: Any) -> "MaskedDistillation | None":
        section = pick(MDTConfig, config)
        if not section.mdt:
            return None
        if not trains_on_synthetic:
            raise FastddError(
                f"--mdt does not apply to {method}: MDT masks the inputs of networks that the matching objective "
                f"trains on the synthetic images, and {method}'s matching networks are never trained on them; use "
                "--mdt with dc, dsa, mtt, tesla or tesla-compat."
            )
        return cls(section)

    def on_synthetic_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` ``[N, C, H, W]`` times a fresh ``[N, 1, H, W]`` mask from ``generator`` (differentiable in ``x``)."""
        if self.ratio == 0:
            return x
        return mask_images(x, self.ratio, generator=generator, unit=self.config.mask_unit, patch=self.patch)

    def synthetic_training_options(self) -> dict[str, Any]:
        return {} if self.ratio == 0 else {"input_transform": self.on_synthetic_batch}

    def student_options(self) -> dict[str, Any]:
        return {"input_mask": mask_sampler(self.ratio, self.patch, self.config.mask_unit)}
