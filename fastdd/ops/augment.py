"""Differentiable siamese augmentation (DSA) as an op with explicit, replayable parameters.

Sampling and applying are separate steps::

    params = sample_augment_params(1, (32, 32), generator=g)   # batch 1: one transform shared by all images
    real_aug = diff_augment(real, params)
    syn_aug = diff_augment(syn, params)                          # the same transform: siamese

Replaying an augmentation means applying the same ``AugmentParams`` again, never reseeding a random generator.

Families (DSA defaults, see ``AugmentConfig``): ``color`` (brightness, then saturation, then contrast), ``crop``
(integer translation with zero fill), ``cutout`` (a zeroed rectangle), ``flip`` (horizontal), ``scale`` and
``rotate`` (bilinear resampling). Mode ``"S"`` applies one family drawn uniformly per call (the DSA/MTT default),
mode ``"M"`` applies every family of the strategy in strategy order.

Backends of ``diff_augment`` (all give the same result up to rounding, differentiable at any order):
  ``"reference"``  pure PyTorch, one function per family (``_augment_reference``); the test oracle and the fallback.
  ``"cpp"``        ``torch.ops.fastdd.diff_augment``: each image runs through all its families in one pass
                   (OpenMP over images); the gradient is the adjoint op ``torch.ops.fastdd.diff_augment_adjoint``.
  ``"triton"``     ``fastdd.kernels.diff_augment`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
  ``"auto"``       CUDA tensor: triton, else reference. CPU tensor: cpp, else reference.

dtypes: images are float32, float64, bfloat16 or float16 and the result has their dtype; the parameters are whatever
``sample_augment_params`` drew (float32, int64, bool) and never need to match. Every backend augments bfloat16 and
float16 images in float32 (parameters included) and rounds the result to the images' dtype.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastdd.ops import _augment_compiled, _augment_reference
from fastdd.ops._dispatch import BACKENDS, choose_backend, unavailable_reason

FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
MODES: tuple[str, ...] = ("S", "M", "none")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges that ``sample_augment_params`` draws from; the defaults are those of the DSA reference.

    The affine families resample with ``align_corners=True``, as the MTT/TESLA reference does (torch's own
    default, and what the original DSA code ends up with by not passing the argument, is False).
    """

    brightness: float = 0.5  # additive delta ~ U(-brightness, brightness)
    saturation: tuple[float, float] = (0.0, 2.0)  # factor ~ U(low, high) around the per-pixel channel mean
    contrast: tuple[float, float] = (0.5, 1.5)  # factor ~ U(low, high) around the per-image mean
    crop_ratio: float = 0.125  # shift up to int(H * ratio + 0.5) rows and int(W * ratio + 0.5) columns
    cutout_ratio: float = 0.5  # rectangle of int(H * ratio + 0.5) x int(W * ratio + 0.5) pixels
    flip_probability: float = 0.5
    scale_ratio: float = 1.2  # sx, sy ~ U(1 / ratio, ratio)
    rotate_degrees: float = 15.0  # angle ~ U(-degrees, degrees)
    align_corners: bool = True


DEFAULT_AUGMENT_CONFIG = AugmentConfig()

# name -> (field of AugmentParams, trailing shape, dtype kind) for every per-image tensor.
_TENSOR_FIELDS: dict[str, tuple[tuple[str, tuple[int, ...], str], ...]] = {
    "color": (("brightness", (), "float"), ("saturation", (), "float"), ("contrast", (), "float")),
    "crop": (("crop_shift", (2,), "int"),),
    "cutout": (("cutout_center", (2,), "int"),),
    "flip": (("flip", (), "bool"),),
    "scale": (("scale", (2,), "float"),),
    "rotate": (("rotation", (), "float"),),
}
_ALL_TENSOR_FIELDS = tuple(name for fields in _TENSOR_FIELDS.values() for name, _, _ in fields)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """The sampled parameters of one augmentation call; apply them with ``diff_augment``.

    ``families`` lists the applied families in order (empty = identity). Families not listed carry None.
    Per-image tensors have a leading dimension ``batch``: ``batch == 1`` applies the same transform to every
    image of any batch (siamese), ``batch == len(x)`` gives one transform per image.

    Attributes:
        families: applied families in order, from ``FAMILIES``.
        batch: number of transforms (1 = shared by all images).
        image_size: (H, W) the parameters were drawn for; ``diff_augment`` requires images of this size.
        brightness: [batch] float, additive delta.
        saturation: [batch] float, factor around each pixel's channel mean.
        contrast: [batch] float, factor around each image's mean.
        crop_shift: [batch, 2] int64 (row, column) offsets: output pixel (r, c) reads input (r + dr, c + dc),
            zero when that falls outside the image.
        cutout_center: [batch, 2] int64 (row, column) centre of the zeroed rectangle.
        cutout_size: (h, w) of the zeroed rectangle (None unless cutout applies).
        flip: [batch] bool, True = mirror left-right.
        scale: [batch, 2] float (sx, sy): output coordinate (u, v) in [-1, 1] samples the input at (sx u, sy v).
        rotation: [batch] float, radians, positive = counter-clockwise as displayed.
        align_corners: the ``F.affine_grid``/``F.grid_sample`` convention of the scale and rotate families.
    """

    families: tuple[str, ...]
    batch: int
    image_size: tuple[int, int]
    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    crop_shift: Tensor | None = None
    cutout_center: Tensor | None = None
    cutout_size: tuple[int, int] | None = None
    flip: Tensor | None = None
    scale: Tensor | None = None
    rotation: Tensor | None = None
    align_corners: bool = True

    def __post_init__(self) -> None:
        families = tuple(self.families)
        object.__setattr__(self, "families", families)
        object.__setattr__(self, "image_size", _as_image_size(self.image_size))
        _check_families(families)
        batch = _positive_int(self.batch)
        if batch is None:
            raise ValueError(f"AugmentParams.batch must be a positive int, got {self.batch!r}")
        object.__setattr__(self, "batch", batch)
        for family, fields in _TENSOR_FIELDS.items():
            for name, trailing, kind in fields:
                value = getattr(self, name)
                if family not in families:
                    if value is not None:
                        raise ValueError(f"AugmentParams.{name} is set but family {family!r} is not in {families}")
                    continue
                expected = (self.batch, *trailing)
                if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                    got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"AugmentParams.{name} must be a tensor of shape {expected}, got {got}")
                if _dtype_kind(value.dtype) != kind:
                    raise ValueError(f"AugmentParams.{name} must have a {kind} dtype, got {value.dtype}")
        if ("cutout" in families) != (self.cutout_size is not None):
            raise ValueError("AugmentParams.cutout_size must be set exactly when the cutout family applies")
        if self.cutout_size is not None:
            object.__setattr__(self, "cutout_size", _as_image_size(self.cutout_size))

    @property
    def device(self) -> torch.device | None:
        """Device of the parameter tensors (None when no family applies)."""
        for name in _ALL_TENSOR_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return value.device
        return None

    def _map_tensors(self, fn: Callable[[Tensor], Tensor], batch: int) -> AugmentParams:
        changes = {name: fn(getattr(self, name)) for name in _ALL_TENSOR_FIELDS if getattr(self, name) is not None}
        return dataclasses.replace(self, batch=batch, **changes)

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same parameters with every tensor on ``device``."""
        return self._map_tensors(lambda t: t.to(device), self.batch)

    def select(self, index: Tensor | Sequence[int]) -> AugmentParams:
        """Parameters of the sub-batch ``index`` (int64 indices or a [batch] bool mask).

        Shared parameters (``batch == 1``) already fit any sub-batch and are returned unchanged.
        """
        if self.batch == 1:
            return self
        index = torch.as_tensor(index)
        if index.dtype != torch.bool and index.dtype.is_floating_point:
            raise ValueError(f"select() needs integer indices or a bool mask, got dtype {index.dtype}")
        if index.dim() != 1:
            raise ValueError(f"select() needs a 1-D index, got shape {tuple(index.shape)}")
        if index.dtype == torch.bool and index.numel() != self.batch:
            raise ValueError(f"select() bool mask has {index.numel()} entries but params.batch is {self.batch}")
        device = self.device
        if device is not None:
            index = index.to(device)
        batch = int(index.sum()) if index.dtype == torch.bool else index.numel()
        if batch == 0:
            raise ValueError("select() would produce an empty AugmentParams; index at least one image")
        return self._map_tensors(lambda t: t[index], batch)

    def signature(self) -> tuple:
        """What must agree for two parameter sets to be applied in one call: families (in order), image size, cutout
        size and the resampling convention (see :func:`cat_augment_params`)."""
        return (self.families, self.image_size, self.cutout_size, self.align_corners)


def cat_augment_params(params: Sequence[AugmentParams], rows: Sequence[int]) -> AugmentParams:
    """One parameter set for the concatenation of several batches: ``diff_augment(cat(xs), cat_augment_params(ps,
    [len(x) for x in xs]))`` equals ``cat([diff_augment(x, p) for x, p in zip(xs, ps)])``, each image going through
    its own transform (batched trajectory-matching students augment their minibatches in one call).

    Args:
        params: parameter sets with the same :meth:`AugmentParams.signature` (the same families in the same order).
        rows: the number of images each set applies to; a shared set (``batch == 1``) is repeated that many times,
            any other must have ``batch == rows[i]``.

    Raises:
        ValueError: no sets, a different number of row counts, sets that differ in signature, or a batch that is
            neither 1 nor its row count.
    """
    if not params or len(params) != len(rows):
        raise ValueError(f"cat_augment_params needs one row count per parameter set, got {len(params)} sets and "
                         f"{len(rows)} counts")
    first = params[0]
    for p, n in zip(params, rows):
        if p.signature() != first.signature():
            raise ValueError(f"cat_augment_params needs the same families, image size, cutout size and align_corners, "
                             f"got {first.signature()} and {p.signature()}")
        if p.batch not in (1, n):
            raise ValueError(f"a parameter set of batch {p.batch} cannot apply to {n} images (1 or {n})")
    if len(params) == 1 and params[0].batch == rows[0]:
        return params[0]
    changes = {}
    for name in _ALL_TENSOR_FIELDS:
        if getattr(first, name) is None:
            continue
        parts = [getattr(p, name) for p in params]
        changes[name] = torch.cat([t.expand(n, *t.shape[1:]) for t, n in zip(parts, rows)])
    return dataclasses.replace(first, batch=sum(rows), **changes)


def _positive_int(value: object) -> int | None:
    """``value`` as an int if it is a positive integer (Python, NumPy or 0-d tensor; not bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number > 0 else None


def _as_image_size(size: int | Sequence[int]) -> tuple[int, int]:
    items = tuple(size) if isinstance(size, Sequence) else (size, size)
    pair = tuple(_positive_int(v) for v in items)
    if len(pair) != 2 or None in pair:
        raise ValueError(f"an image size must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return pair


def _check_families(families: tuple[str, ...]) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown augmentation family {unknown[0]!r}; valid families are {', '.join(FAMILIES)}")
    if len(set(families)) != len(families):
        raise ValueError(f"augmentation families must not repeat, got {'_'.join(families)!r}")


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """``"color_crop_flip"`` -> ("color", "crop", "flip"); ``""`` and ``"none"`` -> () (identity)."""
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a str such as {DEFAULT_STRATEGY!r}, got {type(strategy).__name__}")
    if strategy.lower() in ("", "none"):
        return ()
    families = tuple(strategy.split("_"))
    _check_families(families)
    return families


def _uniform(n: int, shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand((n, *shape), generator=generator) * (high - low) + low


def _sample_family(
    family: str, batch: int, size: tuple[int, int], config: AugmentConfig, generator: torch.Generator
) -> dict:
    height, width = size
    if family == "color":
        return {
            "brightness": _uniform(batch, (), -config.brightness, config.brightness, generator),
            "saturation": _uniform(batch, (), *config.saturation, generator),
            "contrast": _uniform(batch, (), *config.contrast, generator),
        }
    if family == "crop":
        max_rows = int(height * config.crop_ratio + 0.5)
        max_cols = int(width * config.crop_ratio + 0.5)
        rows = torch.randint(-max_rows, max_rows + 1, (batch,), generator=generator)
        cols = torch.randint(-max_cols, max_cols + 1, (batch,), generator=generator)
        return {"crop_shift": torch.stack([rows, cols], dim=1)}
    if family == "cutout":
        cut = (int(height * config.cutout_ratio + 0.5), int(width * config.cutout_ratio + 0.5))
        # As in DSA: an even-sized rectangle may also be centred one past the last row/column, which makes the
        # clipped extremes at both borders equally large.
        rows = torch.randint(0, height + 1 - cut[0] % 2, (batch,), generator=generator)
        cols = torch.randint(0, width + 1 - cut[1] % 2, (batch,), generator=generator)
        return {"cutout_center": torch.stack([rows, cols], dim=1), "cutout_size": cut}
    if family == "flip":
        return {"flip": torch.rand(batch, generator=generator) < config.flip_probability}
    if family == "scale":
        return {"scale": _uniform(batch, (2,), 1.0 / config.scale_ratio, config.scale_ratio, generator)}
    if family == "rotate":
        limit = math.radians(config.rotate_degrees)
        return {"rotation": _uniform(batch, (), -limit, limit, generator)}
    raise AssertionError(f"unhandled augmentation family {family!r}")


def sample_augment_params(
    batch: int,
    image_size: tuple[int, int] | int,
    *,
    strategy: str = DEFAULT_STRATEGY,
    mode: str = "S",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    config: AugmentConfig = DEFAULT_AUGMENT_CONFIG,
) -> AugmentParams:
    """Draw the parameters of one DSA call.

    Args:
        batch: number of transforms: 1 for one transform shared by every image (siamese), or the batch size of
            the images it will be applied to for one transform per image.
        image_size: (H, W) or H of the images; crop and cutout sizes derive from it.
        strategy: families joined by ``_`` (see ``FAMILIES``); ``""`` or ``"none"`` = identity.
        mode: ``"S"`` applies one family drawn uniformly from the strategy, ``"M"`` all of them in strategy
            order, ``"none"`` nothing.
        generator: CPU ``torch.Generator`` every draw comes from. None = a fresh generator seeded from OS
            entropy (not reproducible; the global RNG is never touched).
        device: where the returned tensors live (draws happen on CPU, then move), default CPU.
        config: ranges of the draws (DSA defaults).

    Returns:
        AugmentParams with ``batch`` transforms for images of ``image_size``.
    """
    count = _positive_int(batch)
    if count is None:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    size = _as_image_size(image_size)
    families = parse_strategy(strategy)
    if mode not in MODES:
        raise ValueError(f"unknown augmentation mode {mode!r}; valid modes are {', '.join(MODES)}")
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")

    if mode == "none":
        families = ()
    elif mode == "S" and families:
        families = (families[int(torch.randint(len(families), (1,), generator=generator))],)
    fields: dict = {}
    for family in families:
        fields.update(_sample_family(family, count, size, config, generator))
    params = AugmentParams(
        families=families, batch=count, image_size=size, align_corners=config.align_corners, **fields
    )
    return params if device is None else params.to(device)


def diff_augment(x: Tensor, params: AugmentParams, *, backend: str = "auto") -> Tensor:
    """Apply sampled augmentation parameters to a batch of images, differentiably w.r.t. ``x``.

    Args:
        x: [B, C, H, W] floating-point images, (H, W) == ``params.image_size``.
        params: from ``sample_augment_params``; ``params.batch`` must be 1 (same transform for all images) or B.
            They may stay on CPU while x is on a GPU (each tensor is copied where it is needed); shared crop and
            flip parameters are read as Python numbers, so keeping params on CPU avoids a device sync.
        backend: ``"auto"``, ``"reference"``, ``"cpp"`` or ``"triton"`` (see the module docstring). The compiled
            backends take float32, float64, bfloat16 and float16 images (the half-precision ones computed in
            float32).

    Returns:
        [B, C, H, W] augmented images in x's dtype (``x`` itself when no family applies), contiguous for the
        compiled backends.

    Raises:
        TypeError: x is not a tensor or params is not ``AugmentParams``.
        ValueError: bad shapes or dtype, params of another batch or image size, or an unknown backend.
        RuntimeError: the requested backend cannot run these images here (the message says why).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown diff_augment backend {backend!r}; valid backends are {', '.join(BACKENDS)}")
    if not isinstance(x, Tensor):
        raise TypeError(f"diff_augment expects x to be a torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if not isinstance(params, AugmentParams):
        raise TypeError(f"diff_augment expects params to be AugmentParams, got {type(params).__name__}")
    if x.dim() != 4:
        raise ValueError(f"diff_augment expects x of shape [B, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"diff_augment expects floating-point images, got dtype {x.dtype}")
    if params.batch not in (1, x.shape[0]):
        raise ValueError(
            f"params.batch is {params.batch} but x has batch {x.shape[0]} (shape {tuple(x.shape)}); "
            "sample params with batch 1 (shared transform) or batch equal to len(x)"
        )
    if tuple(x.shape[-2:]) != params.image_size:
        raise ValueError(
            f"params were sampled for images of size {params.image_size} but x has shape {tuple(x.shape)}"
        )
    if not params.families:
        return x
    chosen = resolve_backend(backend, x)
    if chosen == "reference":
        return _augment_reference.augment_reference(x, params)
    args = _augment_compiled.kernel_arguments(params, x.device)
    if chosen == "cpp":
        return _augment_compiled.augment_cpp(x, args)
    return _augment_compiled.augment_triton(x, args)


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend ``diff_augment`` runs for images ``x``: ``backend`` itself, or auto's choice.

    Raises ValueError for an unknown name and RuntimeError, with the reason, for a backend that cannot run here.
    """
    return choose_backend(
        "diff_augment", backend, x, triton_kernel=_augment_compiled.TRITON_KERNEL, cuda_kernel=False
    )


def backend_unavailable_reason(backend: str, x: Tensor) -> str | None:
    """Why ``backend`` cannot run ``diff_augment`` on images like ``x``, or None when it can."""
    return unavailable_reason(backend, x, triton_kernel=_augment_compiled.TRITON_KERNEL, cuda_kernel=False)
