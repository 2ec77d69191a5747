"""ZCA whitening of images, fitted with kornia and storable as three tensors.

Convention (as in the trajectory-matching literature): fit on the real training images in [0, 1] (no mean/std
normalisation), with ``eps = 0.1`` added to the covariance eigenvalues and the unbiased (N - 1) covariance. The
whitened images are the model space; :meth:`ZCA.inverse` maps them back for viewing.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_EPS = 0.1


class ZCA(nn.Module):
    """ZCA whitening ``x -> (x - mean) @ W`` over flattened images, with ``W = U (S + eps)^-1/2 U^T``.

    Build it with ``ZCA().fit(unit_images)`` or rebuild a saved one with ``ZCA.from_tensors(**zca.state_tensors())``.
    The fitted tensors are buffers, so ``.to(device)`` moves them.

    Attributes:
        eps: the value added to the covariance eigenvalues when fitting.
        mean_vector: ``[1, D]`` mean of the fitted images, ``D = C * H * W``.
        transform_matrix: ``[D, D]`` whitening matrix ``W``.
        inverse_matrix: ``[D, D]`` its inverse ``U (S + eps)^1/2 U^T``.
    """

    mean_vector: torch.Tensor | None
    transform_matrix: torch.Tensor | None
    inverse_matrix: torch.Tensor | None

    def __init__(self, eps: float = DEFAULT_EPS) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = float(eps)
        self.register_buffer("mean_vector", None)
        self.register_buffer("transform_matrix", None)
        self.register_buffer("inverse_matrix", None)

    @property
    def fitted(self) -> bool:
        return self.transform_matrix is not None

    @property
    def num_features(self) -> int:
        """``D``, the flattened image size the transform applies to."""
        self._check_fitted()
        return self.transform_matrix.shape[0]

    def fit(self, unit_images: torch.Tensor) -> "ZCA":
        """Fit the whitening to a set of images with kornia's ``ZCAWhitening(eps, compute_inv=True)``.

        Args:
            unit_images: ``[N, C, H, W]`` (or any ``[N, ...]``) float images in [0, 1], ``N >= 2``.

        Returns:
            ``self``, fitted; its buffers are float32 (float64 if the input is float64), on the input's device.
        """
        from kornia.enhance import ZCAWhitening

        if unit_images.dim() < 2 or unit_images.shape[0] < 2:
            raise ValueError(f"fit needs [N, ...] images with N >= 2, got shape {tuple(unit_images.shape)}")
        if not unit_images.is_floating_point():
            raise TypeError(f"fit needs floating-point images in [0, 1], got dtype {unit_images.dtype}")
        flat = unit_images.detach().reshape(unit_images.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        whitening = ZCAWhitening(eps=self.eps, compute_inv=True).fit(flat)
        self.mean_vector = whitening.mean_vector.reshape(1, -1)
        self.transform_matrix = whitening.transform_matrix
        self.inverse_matrix = whitening.transform_inv
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten images.

        Args:
            x: ``[B, C, H, W]`` (any ``[B, ...]`` with ``D`` features per sample), float, [0, 1] pixel scale.

        Returns:
            ``[B, C, H, W]`` whitened images, same dtype and device as ``x`` (differentiable w.r.t. ``x``).
        """
        flat = self._flatten(x)
        mean, transform = self.mean_vector.to(flat), self.transform_matrix.to(flat)
        return ((flat - mean) @ transform).reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the whitening (no clamping).

        Args:
            x: ``[B, C, H, W]`` whitened images.

        Returns:
            ``[B, C, H, W]`` images on the [0, 1] pixel scale, same dtype and device as ``x``.
        """
        flat = self._flatten(x)
        mean, inverse = self.mean_vector.to(flat), self.inverse_matrix.to(flat)
        return torch.addmm(mean, flat, inverse).reshape(x.shape)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted transform as plain tensors (for safetensors files).

        Returns:
            ``{"zca_mean": [1, D], "zca_transform": [D, D], "zca_inverse": [D, D]}``, detached.
        """
        self._check_fitted()
        return {
            "zca_mean": self.mean_vector.detach(),
            "zca_transform": self.transform_matrix.detach(),
            "zca_inverse": self.inverse_matrix.detach(),
        }

    @classmethod
    def from_tensors(
        cls,
        zca_mean: torch.Tensor,
        zca_transform: torch.Tensor,
        zca_inverse: torch.Tensor,
        *,
        eps: float = DEFAULT_EPS,
    ) -> "ZCA":
        """Rebuild a fitted ZCA from :meth:`state_tensors` (``eps`` is informational: it is baked into the matrices).

        Args:
            zca_mean: ``[1, D]`` (or ``[D]``) mean vector.
            zca_transform: ``[D, D]`` whitening matrix.
            zca_inverse: ``[D, D]`` inverse matrix.
        """
        mean = zca_mean.reshape(1, -1)
        d = mean.shape[1]
        if zca_transform.shape != (d, d) or zca_inverse.shape != (d, d):
            raise ValueError(
                f"ZCA tensors disagree: mean {tuple(zca_mean.shape)}, transform {tuple(zca_transform.shape)}, "
                f"inverse {tuple(zca_inverse.shape)}; expected [1, D], [D, D], [D, D]"
            )
        zca = cls(eps)
        zca.mean_vector = mean.detach().clone()
        zca.transform_matrix = zca_transform.detach().clone()
        zca.inverse_matrix = zca_inverse.detach().clone()
        return zca

    def extra_repr(self) -> str:
        features = self.transform_matrix.shape[0] if self.fitted else "unfitted"
        return f"eps={self.eps}, features={features}"

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("this ZCA is not fitted; call fit(unit_images) or build it with ZCA.from_tensors")

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        d = self.transform_matrix.shape[0]
        if x.dim() < 2 or x[0].numel() != d:
            raise ValueError(f"ZCA was fitted on {d} features per image, got input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"ZCA needs floating-point images, got dtype {x.dtype}")
        return x.reshape(x.shape[0], d)
