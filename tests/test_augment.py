"""DSA augmentation: every family against hand computations, siamese replay, sampling laws, gradients, errors."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdd.ops.augment import (
    FAMILIES,
    AugmentConfig,
    AugmentParams,
    diff_augment,
    sample_augment_params,
)

ALL = "_".join(FAMILIES)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_params(family: str, batch: int, image_size, **fields) -> AugmentParams:
    return AugmentParams(families=(family,), batch=batch, image_size=image_size, **fields)


def color_params(brightness, saturation, contrast, image_size) -> AugmentParams:
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return AugmentParams(
        families=("color",),
        batch=len(brightness),
        image_size=image_size,
        brightness=as_tensor(brightness),
        saturation=as_tensor(saturation),
        contrast=as_tensor(contrast),
    )


def repeated(params: AugmentParams, n: int) -> AugmentParams:
    """batch-1 params copied n times: the per-image code path with the shared transform."""
    tensors = {
        f.name: getattr(params, f.name).expand(n, *getattr(params, f.name).shape[1:]).clone()
        for f in dataclasses.fields(params)
        if isinstance(getattr(params, f.name), torch.Tensor)
    }
    return dataclasses.replace(params, batch=n, **tensors)


# ---------------------------------------------------------------------------------------------- color family


def test_brightness_adds_the_delta_exactly():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=seeded(1))
    params = color_params([0.25, -0.5], [1.0, 1.0], [1.0, 1.0], (4, 5))
    out = diff_augment(x, params)
    torch.testing.assert_close(out, torch.cat([x[:1] + 0.25, x[1:] - 0.5]), rtol=0, atol=1e-15)


def test_saturation_scales_deviation_from_pixel_channel_mean():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=seeded(2))
    factors = [0.3, 1.7]
    out = diff_augment(x, color_params([0.0, 0.0], factors, [1.0, 1.0], (3, 4)))
    expected = torch.empty_like(x)
    for i in range(2):
        for r in range(3):
            for c in range(4):
                mean = (x[i, 0, r, c] + x[i, 1, r, c] + x[i, 2, r, c]) / 3
                for ch in range(3):
                    expected[i, ch, r, c] = mean + factors[i] * (x[i, ch, r, c] - mean)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_saturation_is_a_no_op_on_one_channel_images():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=seeded(3))
    out = diff_augment(x, color_params([0.1, 0.2], [0.0, 2.0], [0.6, 1.3], 4))
    assert torch.equal(out, diff_augment(x, color_params([0.1, 0.2], [1.0, 1.0], [0.6, 1.3], 4)))


def test_contrast_scales_deviation_from_image_mean():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=seeded(4))
    factors = [0.5, 1.4]
    out = diff_augment(x, color_params([0.0, 0.0], [1.0, 1.0], factors, (3, 4)))
    for i in range(2):
        mean = x[i].sum() / x[i].numel()
        torch.testing.assert_close(out[i], mean + factors[i] * (x[i] - mean), rtol=0, atol=1e-12)


def test_color_applies_brightness_then_saturation_then_contrast():
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=seeded(5))
    b, s, k = 0.3, 1.6, 0.7
    y = x + b
    y = (y - y.mean(1, keepdim=True)) * s + y.mean(1, keepdim=True)
    y = (y - y.mean()) * k + y.mean()
    torch.testing.assert_close(diff_augment(x, color_params([b], [s], [k], 5)), y, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ geometric families


def shifted_by_hand(image: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    out = torch.zeros_like(image)
    height, width = image.shape[-2:]
    for r in range(height):
        for c in range(width):
            if 0 <= r + dr < height and 0 <= c + dc < width:
                out[:, r, c] = image[:, r + dr, c + dc]
    return out


@pytest.mark.parametrize("shifts", [[[1, -2], [-3, 4], [0, 0]], [[2, 3]], [[-5, 0]], [[7, -9], [0, 6], [-1, -1]]])
def test_crop_is_an_integer_shift_with_zero_fill(shifts):
    x = torch.arange(3 * 2 * 5 * 6, dtype=torch.float64).view(3, 2, 5, 6) + 1
    params = hand_params("crop", len(shifts), (5, 6), crop_shift=torch.tensor(shifts))
    out = diff_augment(x, params)
    for i in range(3):
        dr, dc = shifts[i if len(shifts) > 1 else 0]
        assert torch.equal(out[i], shifted_by_hand(x[i], dr, dc)), f"image {i}, shift {(dr, dc)}"


@pytest.mark.parametrize("size", [(3, 3), (4, 2)])
def test_cutout_zeroes_exactly_the_clipped_rectangle(size):
    height, width = 6, 7
    centers = [[0, 0], [3, 4], [6, 7], [5, 1]]
    x = torch.rand(4, 2, height, width, dtype=torch.float64, generator=seeded(6)) + 1.0  # never zero
    params = hand_params("cutout", 4, (height, width), cutout_center=torch.tensor(centers), cutout_size=size)
    out = diff_augment(x, params)
    for i, (cr, cc) in enumerate(centers):
        for r in range(height):
            for c in range(width):
                zeroed = cr - size[0] // 2 <= r < cr - size[0] // 2 + size[0] and (
                    cc - size[1] // 2 <= c < cc - size[1] // 2 + size[1]
                )
                expected = torch.zeros(2, dtype=x.dtype) if zeroed else x[i, :, r, c]
                assert torch.equal(out[i, :, r, c], expected), (i, r, c)


def test_flip_mirrors_only_flagged_images():
    x = torch.randn(3, 2, 4, 5, generator=seeded(7))
    out = diff_augment(x, hand_params("flip", 3, (4, 5), flip=torch.tensor([True, False, True])))
    assert torch.equal(out[0], torch.flip(x[0], dims=[2]))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], torch.flip(x[2], dims=[2]))
    assert torch.equal(diff_augment(x, hand_params("flip", 1, (4, 5), flip=torch.tensor([True]))), x.flip(3))
    assert torch.equal(diff_augment(x, hand_params("flip", 1, (4, 5), flip=torch.tensor([False]))), x)


@pytest.mark.parametrize("align_corners", [True, False])
def test_unit_scale_and_zero_rotation_are_the_identity(align_corners):
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=seeded(8))
    scale = hand_params("scale", 2, (7, 6), scale=torch.ones(2, 2), align_corners=align_corners)
    rotate = hand_params("rotate", 1, (7, 6), rotation=torch.zeros(1), align_corners=align_corners)
    torch.testing.assert_close(diff_augment(x, scale), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(diff_augment(x, rotate), x, rtol=0, atol=1e-12)


def test_scale_samples_bilinearly_at_scaled_coordinates_with_align_corners():
    # align_corners=True: column j of a width-5 image sits at u = -1 + j / 2; it reads input column (s*u + 1) * 2.
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64).expand(1, 1, 3, 5).clone()
    zoom_out = hand_params("scale", 1, (3, 5), scale=torch.tensor([[2.0, 1.0]]))
    zoom_in = hand_params("scale", 1, (3, 5), scale=torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(diff_augment(x, zoom_out)[0, 0, 1], torch.tensor([0, 1, 4, 16, 0.0]).double())
    torch.testing.assert_close(diff_augment(x, zoom_in)[0, 0, 1], torch.tensor([2, 3, 4, 6, 8.0]).double())
    # sy acts on rows the same way.
    vertical = hand_params("scale", 1, (5, 3), scale=torch.tensor([[1.0, 2.0]]))
    out = diff_augment(x.transpose(2, 3), vertical)
    torch.testing.assert_close(out[0, 0, :, 1], torch.tensor([0, 1, 4, 16, 0.0]).double())


def test_scale_honours_align_corners_false():
    # align_corners=False: column j of a width-4 image sits at u = (2j + 1) / 4 - 1 and reads ((s*u + 1) * 4 - 1) / 2.
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64).expand(1, 1, 2, 4).clone()
    params = hand_params("scale", 1, (2, 4), scale=torch.tensor([[0.5, 1.0]]), align_corners=False)
    positions = [0.75, 1.25, 1.75, 2.25]
    row = x[0, 0, 0]
    expected = torch.stack([row[int(p)] * (1 - p % 1) + row[int(p) + 1] * (p % 1) for p in positions])
    torch.testing.assert_close(diff_augment(x, params)[0, 0, 0], expected)


@pytest.mark.parametrize("size", [5, 6])
@pytest.mark.parametrize("align_corners", [True, False])
def test_quarter_turns_match_rot90(size, align_corners):
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=seeded(9))
    for angle, k in [(math.pi / 2, 1), (-math.pi / 2, -1)]:
        rotation = torch.tensor([angle], dtype=torch.float64)
        params = hand_params("rotate", 1, size, rotation=rotation, align_corners=align_corners)
        torch.testing.assert_close(diff_augment(x, params), torch.rot90(x, k, dims=(2, 3)), rtol=0, atol=1e-9)


def bilinear_by_hand(image: torch.Tensor, row: float, col: float) -> torch.Tensor:
    """image [C, H, W] sampled at fractional (row, col); pixels outside the image count as zero."""
    height, width = image.shape[-2:]
    r0, c0 = math.floor(row), math.floor(col)
    value = torch.zeros(image.shape[0], dtype=image.dtype)
    for r, wr in ((r0, 1 - (row - r0)), (r0 + 1, row - r0)):
        for c, wc in ((c0, 1 - (col - c0)), (c0 + 1, col - c0)):
            if 0 <= r < height and 0 <= c < width:
                value += wr * wc * image[:, r, c]
    return value


@pytest.mark.parametrize("align_corners", [True, False])
def test_rotate_and_scale_sample_where_the_affine_map_says(align_corners):
    # Output pixel (r, c) sits at normalised (u, v) and reads the input at (m00 u + m01 v, m10 u + m11 v).
    height, width = 7, 6
    x = torch.rand(1, 2, height, width, dtype=torch.float64, generator=seeded(10))
    angle, sx, sy = math.radians(15), 1.15, 0.9
    rotation = torch.tensor([angle], dtype=torch.float64)
    scale = torch.tensor([[sx, sy]], dtype=torch.float64)
    cases = [
        (
            hand_params("rotate", 1, (height, width), rotation=rotation, align_corners=align_corners),
            ((math.cos(angle), -math.sin(angle)), (math.sin(angle), math.cos(angle))),
        ),
        (
            hand_params("scale", 1, (height, width), scale=scale, align_corners=align_corners),
            ((sx, 0.0), (0.0, sy)),
        ),
    ]

    def to_normalised(i, n):
        return -1 + 2 * i / (n - 1) if align_corners else (2 * i + 1) / n - 1

    def to_pixel(u, n):
        return (u + 1) / 2 * (n - 1) if align_corners else ((u + 1) * n - 1) / 2

    for params, ((m00, m01), (m10, m11)) in cases:
        out = diff_augment(x, params)
        for r in range(height):
            for c in range(width):
                u, v = to_normalised(c, width), to_normalised(r, height)
                source_row, source_col = to_pixel(m10 * u + m11 * v, height), to_pixel(m00 * u + m01 * v, width)
                expected = bilinear_by_hand(x[0], source_row, source_col)
                torch.testing.assert_close(out[0, :, r, c], expected, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------- siamese


@pytest.mark.parametrize("strategy", [*FAMILIES, ALL])
def test_shared_params_transform_every_image_identically(strategy):
    image = torch.randn(1, 3, 10, 10, generator=seeded(11))
    x = image.expand(5, -1, -1, -1).clone()
    params = sample_augment_params(1, 10, strategy=strategy, mode="M", generator=seeded(12))
    out = diff_augment(x, params)
    for i in range(5):
        assert torch.equal(out[i], out[0])
    assert torch.equal(diff_augment(image, params), out[:1])


@pytest.mark.parametrize("strategy", [*FAMILIES, ALL])
@pytest.mark.parametrize("channels", [1, 3])
def test_shared_params_equal_the_same_params_given_per_image(strategy, channels):
    # The batch-1 fast paths (negative pad, folded grid, single flip) against the per-image paths.
    x = torch.randn(4, channels, 9, 8, dtype=torch.float64, generator=seeded(13))
    for seed in range(4):
        params = sample_augment_params(1, (9, 8), strategy=strategy, mode="M", generator=seeded(seed))
        torch.testing.assert_close(diff_augment(x, params), diff_augment(x, repeated(params, 4)), rtol=0, atol=1e-12)


def test_per_image_params_give_different_transforms():
    x = torch.randn(1, 3, 12, 12, generator=seeded(14)).expand(6, -1, -1, -1).clone()
    params = sample_augment_params(6, 12, mode="M", generator=seeded(15))
    out = diff_augment(x, params)
    for i in range(6):
        for j in range(i):
            assert not torch.allclose(out[i], out[j]), (i, j)


def test_select_returns_the_params_of_a_sub_batch():
    x = torch.randn(6, 3, 8, 8, generator=seeded(16))
    params = sample_augment_params(6, 8, mode="M", generator=seeded(17))
    index = torch.tensor([4, 1, 1])
    torch.testing.assert_close(diff_augment(x[index], params.select(index)), diff_augment(x, params)[index])
    mask = torch.tensor([True, False, False, True, True, False])
    sub = params.select(mask)
    assert sub.batch == 3
    torch.testing.assert_close(diff_augment(x[mask], sub), diff_augment(x, params)[mask])
    shared = sample_augment_params(1, 8, mode="M", generator=seeded(18))
    assert shared.select(index) is shared


# ------------------------------------------------------------------------------------------------ sampling


def assert_same_params(a: AugmentParams, b: AugmentParams) -> None:
    for field in dataclasses.fields(AugmentParams):
        va, vb = getattr(a, field.name), getattr(b, field.name)
        assert torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb, field.name


def test_same_generator_seed_gives_identical_params():
    for mode in ("S", "M"):
        a = sample_augment_params(7, 32, mode=mode, generator=seeded(3))
        b = sample_augment_params(7, 32, mode=mode, generator=seeded(3))
        assert_same_params(a, b)
    c = sample_augment_params(7, 32, mode="M", generator=seeded(4))
    assert not torch.equal(c.rotation, sample_augment_params(7, 32, mode="M", generator=seeded(3)).rotation)


def test_without_generator_draws_differ_and_global_rng_is_untouched():
    state = torch.random.get_rng_state()
    a = sample_augment_params(64, 32, mode="M")
    b = sample_augment_params(64, 32, mode="M")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(a.rotation, b.rotation)


@pytest.mark.parametrize("height, width", [(32, 32), (28, 28), (6, 9)])
def test_draws_follow_the_dsa_ranges(height, width):
    n = 4000
    p = sample_augment_params(n, (height, width), mode="M", generator=seeded(19))
    assert p.families == FAMILIES and p.batch == n and p.image_size == (height, width)
    assert p.brightness.min() >= -0.5 and p.brightness.max() <= 0.5
    assert p.brightness.min() < -0.45 and p.brightness.max() > 0.45
    assert p.saturation.min() >= 0 and p.saturation.max() <= 2 and p.saturation.max() > 1.9
    assert p.contrast.min() >= 0.5 and p.contrast.max() <= 1.5
    for axis, size in enumerate((height, width)):
        s = int(size * 0.125 + 0.5)
        assert set(p.crop_shift[:, axis].tolist()) == set(range(-s, s + 1))
        cut = int(size * 0.5 + 0.5)
        assert p.cutout_size[axis] == cut
        assert set(p.cutout_center[:, axis].tolist()) == set(range(0, size + 1 - cut % 2))
    assert p.crop_shift.dtype == p.cutout_center.dtype == torch.int64
    assert p.flip.dtype == torch.bool and abs(p.flip.float().mean().item() - 0.5) < 0.05
    assert p.scale.min() >= 1 / 1.2 and p.scale.max() <= 1.2 and p.scale.shape == (n, 2)
    assert p.scale.min() < 1 / 1.2 + 0.01 and p.scale.max() > 1.19
    limit = math.radians(15)
    assert p.rotation.abs().max() <= limit and p.rotation.abs().max() > 0.98 * limit


def test_config_overrides_the_ranges():
    config = AugmentConfig(crop_ratio=0.25, rotate_degrees=90.0, flip_probability=1.0, align_corners=False)
    p = sample_augment_params(2000, 32, mode="M", generator=seeded(20), config=config)
    assert p.crop_shift.abs().max() == 8
    assert p.rotation.abs().max() > math.radians(80)
    assert bool(p.flip.all()) and p.align_corners is False


def test_mode_s_picks_each_family_about_equally_often():
    g = seeded(21)
    counts = dict.fromkeys(FAMILIES, 0)
    for _ in range(1200):
        p = sample_augment_params(1, 32, mode="S", generator=g)
        assert len(p.families) == 1
        counts[p.families[0]] += 1
    assert all(140 <= c <= 260 for c in counts.values()), counts  # expected 200 each, sd ~13


def test_mode_m_applies_all_families_in_strategy_order():
    p = sample_augment_params(3, 16, strategy="rotate_color_crop", mode="M", generator=seeded(22))
    assert p.families == ("rotate", "color", "crop")
    assert p.cutout_center is None and p.flip is None and p.scale is None
    assert p.rotation.shape == (3,) and p.crop_shift.shape == (3, 2)


@pytest.mark.parametrize("strategy, mode", [("", "S"), ("none", "M"), (ALL, "none")])
def test_identity_strategies(strategy, mode):
    p = sample_augment_params(4, 8, strategy=strategy, mode=mode, generator=seeded(23))
    x = torch.randn(4, 3, 8, 8)
    assert p.families == () and p.device is None
    assert diff_augment(x, p) is x


def test_params_move_between_devices():
    p = sample_augment_params(3, 8, mode="M", generator=seeded(24), device="meta")
    assert p.device.type == "meta" and p.flip.device.type == "meta" and p.crop_shift.device.type == "meta"
    moved = sample_augment_params(3, 8, mode="M", generator=seeded(24)).to(torch.device("meta"))
    assert moved.device.type == "meta" and moved.rotation.device.type == "meta"
    assert moved.cutout_size == p.cutout_size and moved.families == p.families and moved.batch == 3


# ---------------------------------------------------------------------------------------- inputs and gradients


def test_non_contiguous_input_matches_contiguous():
    x = torch.randn(4, 3, 8, 8, generator=seeded(25))
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for batch in (1, 4):
        p = sample_augment_params(batch, 8, mode="M", generator=seeded(26))
        expected = diff_augment(x, p)
        torch.testing.assert_close(diff_augment(strided, p), expected)
        torch.testing.assert_close(diff_augment(channels_last, p, backend="reference"), expected)


@pytest.mark.parametrize("strategy", [*FAMILIES, ALL])
@pytest.mark.parametrize("batch", [1, 2])
def test_gradcheck(strategy, batch):
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=seeded(27), requires_grad=True)
    params = sample_augment_params(batch, 6, strategy=strategy, mode="M", generator=seeded(28))
    assert torch.autograd.gradcheck(lambda t: diff_augment(t, params), (x,))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: diff_augment(torch.zeros(3, 8, 8), SHARED), r"\[B, C, H, W\].*\(3, 8, 8\)"),
        (lambda: diff_augment(torch.zeros(2, 3, 8, 8, dtype=torch.int64), SHARED), "floating-point.*int64"),
        (lambda: diff_augment(torch.zeros(5, 3, 8, 8), PER_IMAGE_3), r"params.batch is 3.*x has batch 5"),
        (lambda: diff_augment(torch.zeros(3, 3, 8, 9), PER_IMAGE_3), r"size \(8, 8\).*\(3, 3, 8, 9\)"),
        (lambda: diff_augment(torch.zeros(1, 3, 8, 8), SHARED, backend="cuda"), "valid backends are auto"),
        (lambda: sample_augment_params(2, 8, strategy="color_blur"), "'blur'.*color, crop, cutout"),
        (lambda: sample_augment_params(2, 8, strategy="crop_crop"), "must not repeat"),
        (lambda: sample_augment_params(2, 8, mode="X"), "mode 'X'.*S, M, none"),
        (lambda: sample_augment_params(0, 8), "positive int"),
        (lambda: sample_augment_params(2, (8, 0)), "image size"),
        (lambda: sample_augment_params(2, 8, generator=42), "CPU torch.Generator"),
        (lambda: hand_params("crop", 2, 8, crop_shift=torch.zeros(3, 2, dtype=torch.int64)), r"\(2, 2\).*\(3, 2\)"),
        (lambda: hand_params("crop", 2, 8, crop_shift=torch.zeros(2, 2)), "int dtype"),
        (lambda: hand_params("flip", 1, 8), "flip must be a tensor"),
        (lambda: AugmentParams(("flip",), 1, 8, flip=torch.ones(1, dtype=torch.bool), scale=torch.ones(1, 2)), "scale"),
        (lambda: PER_IMAGE_3.select(torch.tensor([True, False])), "2 entries.*batch is 3"),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="torch.Tensor"):
        diff_augment([[1.0]], SHARED)
    with pytest.raises(TypeError, match="AugmentParams"):
        diff_augment(torch.zeros(1, 3, 8, 8), {"families": ()})


SHARED = sample_augment_params(1, 8, mode="M", generator=seeded(0))
PER_IMAGE_3 = sample_augment_params(3, 8, mode="M", generator=seeded(0))


# ------------------------------------------------------------------------------------ compiled backends (cpp, triton)

from half_precision import HALF_DTYPES, assert_close_to_reference, rounded  # noqa: E402

from fastdd import _extension  # noqa: E402
from fastdd.ops import _augment_compiled  # noqa: E402
from fastdd.ops.augment import backend_unavailable_reason  # noqa: E402

_TRITON_MODULE = _augment_compiled._triton_kernels()
needs_cpp = pytest.mark.skipif(not _extension.has_cpp(), reason=f"fastdd._C not built: {_extension.load_error()}")
needs_triton = pytest.mark.skipif(
    backend_unavailable_reason("triton", torch.zeros(1)) is not None,
    reason=f"Triton kernels unavailable: {backend_unavailable_reason('triton', torch.zeros(1))}",
)
COMPILED = [pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
# Family sequences: each family alone, mode M, and orders that put color between the bilinear families.
SEQUENCES = [*FAMILIES, ALL, "rotate_color_crop", "scale_rotate_color", "flip_scale_cutout_color_rotate_crop"]
SHAPES = [(3, 3, 9, 6), (2, 1, 5, 7)]  # odd sizes, C = 3 and C = 1


def sequence_params(strategy, batch, shape, seed, align_corners=True):
    config = AugmentConfig(align_corners=align_corners, flip_probability=0.7)
    return sample_augment_params(batch, shape[2:], strategy=strategy, mode="M", generator=seeded(seed), config=config)


def reference_and_grad(x, params, upstream):
    leaf = x.detach().clone().requires_grad_(True)
    out = diff_augment(leaf, params, backend="reference")
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    return out.detach(), grad


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", ["shared", "per-image"])
@pytest.mark.parametrize("strategy", SEQUENCES)
def test_compiled_backend_matches_reference_float64(backend, strategy, batch, shape):
    seed = SEQUENCES.index(strategy) * 10 + SHAPES.index(shape)
    x = torch.randn(*shape, dtype=torch.float64, generator=seeded(seed))
    upstream = torch.randn(*shape, dtype=torch.float64, generator=seeded(seed + 1))
    params = sequence_params(strategy, 1 if batch == "shared" else shape[0], shape, seed + 2)
    expected, expected_grad = reference_and_grad(x, params, upstream)
    leaf = x.clone().requires_grad_(True)
    out = diff_augment(leaf, params, backend=backend)
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("align_corners", [True, False])
def test_compiled_backend_honours_align_corners(backend, align_corners):
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64, generator=seeded(40))
    for seed in range(3):
        params = sequence_params("scale_rotate", 2, x.shape, 41 + seed, align_corners)
        expected = diff_augment(x, params, backend="reference")
        torch.testing.assert_close(diff_augment(x, params, backend=backend), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_backend_float32(backend):
    x = torch.randn(3, 3, 10, 9, generator=seeded(42))
    for batch in (1, 3):
        params = sequence_params(ALL, batch, x.shape, 43 + batch)
        out = diff_augment(x, params, backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, diff_augment(x.double(), params, backend="reference").float())


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_backend_non_contiguous_input(backend):
    x = torch.randn(3, 7, 9, 3, dtype=torch.float64, generator=seeded(44)).permute(0, 3, 1, 2)  # [3, 3, 7, 9]
    assert not x.is_contiguous()
    for batch in (1, 3):
        params = sequence_params(ALL, batch, x.shape, 45 + batch)
        expected = diff_augment(x.contiguous(), params, backend="reference")
        torch.testing.assert_close(diff_augment(x, params, backend=backend), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(diff_augment(x[::2], params.select([0, 2]), backend=backend), expected[::2])


@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_backend_gradient_is_the_adjoint(backend):
    # <A x - A 0, g> == <x, A^T g>: the gradient is the transpose of the linear part of the map.
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=seeded(46))
    g = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=seeded(47))
    for strategy in (ALL, "rotate_color_crop"):
        params = sequence_params(strategy, 2, x.shape, 48)
        linear = diff_augment(x, params, backend=backend) - diff_augment(torch.zeros_like(x), params, backend=backend)
        leaf = torch.zeros_like(x, requires_grad=True)
        (adjoint,) = torch.autograd.grad(diff_augment(leaf, params, backend=backend), leaf, g)
        torch.testing.assert_close((linear * g).sum(), (x * adjoint).sum(), rtol=1e-12, atol=1e-12)


# bfloat16 / float16 images: every backend augments them in float32 and rounds the result (and the gradient) once;
# against the float64 reference on the same rounded values, with the tolerances of tests/half_precision.py (two
# units of roundoff, 1e-5 absolute). Rotate alone takes the per-image path of the C++ kernel (its shared AVX-512
# block path is float32 only); the Triton interpreter runs the smaller of the two shapes.
@pytest.mark.parametrize("backend", ["reference", *COMPILED])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("batch", ["shared", "per-image"])
@pytest.mark.parametrize("strategy", [ALL, "rotate", "rotate_color_crop"])
def test_half_precision_matches_float64_reference(backend, strategy, batch, dtype):
    shape = (2, 3, 5, 6) if backend == "triton" else (3, 3, 9, 7)
    seed = 60 + [ALL, "rotate", "rotate_color_crop"].index(strategy)
    x = rounded(torch.randn(*shape, dtype=torch.float64, generator=seeded(seed)), dtype)
    upstream = rounded(torch.randn(*shape, dtype=torch.float64, generator=seeded(seed + 1)), dtype)
    params = sequence_params(strategy, 1 if batch == "shared" else shape[0], shape, seed + 2)
    expected, expected_grad = reference_and_grad(x, params, upstream)
    leaf = x.to(dtype).requires_grad_(True)
    out = diff_augment(leaf, params, backend=backend)
    (grad,) = torch.autograd.grad(out, leaf, upstream.to(dtype))
    assert_close_to_reference(out, expected, dtype)
    assert_close_to_reference(grad, expected_grad, dtype)


@needs_cpp
@pytest.mark.parametrize("strategy", ["color", "crop_flip", "scale", "cutout_rotate", ALL])
def test_cpp_gradcheck_and_gradgradcheck(strategy):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=seeded(49), requires_grad=True)
    for batch in (1, 2):
        params = sequence_params(strategy, batch, x.shape, 50 + batch)
        assert torch.autograd.gradcheck(lambda t: diff_augment(t, params, backend="cpp"), (x,))
        assert torch.autograd.gradgradcheck(lambda t: diff_augment(t, params, backend="cpp"), (x,))


@needs_triton
@pytest.mark.parametrize("strategy", [ALL, "rotate_color_crop"])
def test_triton_gradcheck_and_gradgradcheck(strategy):
    # The interpreter runs a few calls per second: a tiny image and gradcheck's random-projection mode.
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=seeded(55), requires_grad=True)
    params = sequence_params(strategy, 1, x.shape, 56)
    call = lambda t: diff_augment(t, params, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(call, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(call, (x,), fast_mode=True)


@needs_cpp
@pytest.mark.parametrize("batch", [1, 2])
def test_opcheck_registered_ops(batch):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=seeded(51), requires_grad=True)
    params = sequence_params(ALL, batch, x.shape, 52)
    args = _augment_compiled.kernel_arguments(params, x.device)
    torch.library.opcheck(torch.ops.fastdd.diff_augment.default, (x, *args))
    torch.library.opcheck(torch.ops.fastdd.diff_augment.default, (x, *args, False))
    torch.library.opcheck(torch.ops.fastdd.diff_augment_adjoint.default, (x, *args))


@needs_cpp
def test_auto_picks_cpp_on_cpu_and_reference_for_other_dtypes():
    from fastdd.ops.augment import resolve_backend

    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.zeros(1, 3, 4, 4, dtype=dtype)) == "cpp"
    assert resolve_backend("auto", torch.zeros(1, 3, 4, 4, dtype=torch.float8_e4m3fn)) == "reference"
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=seeded(53))
    params = sequence_params(ALL, 2, x.shape, 54)
    torch.testing.assert_close(diff_augment(x, params), diff_augment(x, params, backend="reference"))


def test_unavailable_backend_says_why():
    with pytest.raises(RuntimeError, match="diff_augment backend 'cpp' is unavailable: its kernels support float32"):
        diff_augment(torch.zeros(1, 3, 8, 8, dtype=torch.float8_e4m3fn), SHARED, backend="cpp")
    reason = backend_unavailable_reason("triton", torch.zeros(1, 3, 8, 8, device="meta"))
    assert reason is not None and "Triton kernels need CUDA tensors" in reason
    with pytest.raises(ValueError, match="valid backends are auto, reference, cpp, triton"):
        diff_augment(torch.zeros(1, 3, 8, 8), SHARED, backend="fast")


@needs_cpp
def test_registered_op_rejects_bad_parameter_tensors():
    x = torch.zeros(2, 3, 8, 8)
    args = _augment_compiled.kernel_arguments(PER_IMAGE_3, x.device)
    with pytest.raises(RuntimeError, match=r"real_params must be \[1, 6\] or \[2, 6\]"):
        torch.ops.fastdd.diff_augment(x, *args)
    with pytest.raises(RuntimeError, match="unknown family 'blur'"):
        torch.ops.fastdd.diff_augment(torch.zeros(3, 3, 8, 8), "color_blur", *args[1:])


# ------------------------------------------------------------------- cpp fast paths (copies, permutes, lanes)

# Widths around the kernels' cases: the float32 permute loops read a row from one (W <= 16) or two (W <= 32)
# registers and fall back to scalar code above 32; the rotate adjoint keeps 2-4 channels side by side and others in
# planes; shared rotate alone works on blocks of 16 planes (21 planes: a full block and a partial one).
FAST_PATH_SHAPES = [(2, 3, 32, 32), (2, 2, 9, 23), (2, 5, 7, 37), (2, 1, 16, 5), (2, 4, 17, 16), (7, 3, 8, 9)]


@needs_cpp
@pytest.mark.parametrize("shape", FAST_PATH_SHAPES)
@pytest.mark.parametrize("batch", ["shared", "per-image"])
@pytest.mark.parametrize("strategy", [*FAMILIES, ALL, "crop_flip", "flip_crop", "flip_scale", "scale_rotate"])
def test_cpp_float32_forward_and_gradient_match_reference(strategy, batch, shape):
    seed = 60 + FAST_PATH_SHAPES.index(shape)
    x = torch.randn(*shape, generator=seeded(seed))
    upstream = torch.randn(*shape, generator=seeded(seed + 1))
    params = sequence_params(strategy, 1 if batch == "shared" else shape[0], shape, seed + 2)
    expected, expected_grad = reference_and_grad(x.double(), params, upstream.double())
    leaf = x.clone().requires_grad_(True)
    out = diff_augment(leaf, params, backend="cpp")
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad.float(), rtol=1e-5, atol=1e-5)


def crop_flip_by_hand(image: torch.Tensor, dr: int, dc: int, flip_first: bool) -> torch.Tensor:
    return shifted_by_hand(image.flip(-1), dr, dc) if flip_first else shifted_by_hand(image, dr, dc).flip(-1)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flip_first", [False, True])
def test_cpp_crop_and_flip_composed_at_extreme_shifts(dtype, flip_first):
    # One-tap stages run as (reversed) row copies: shifts past either border, by the full size and by one less.
    height, width = 5, 7
    shifts = [[0, 0], [4, -6], [-4, 6], [5, 7], [-5, -7], [9, -9], [1, 3], [-2, -1]]
    n = len(shifts)
    x = torch.randn(n, 2, height, width, dtype=dtype, generator=seeded(70))
    upstream = torch.randn(n, 2, height, width, dtype=dtype, generator=seeded(71))
    flip = torch.tensor([i % 2 == 0 for i in range(n)])
    params = AugmentParams(
        families=("flip", "crop") if flip_first else ("crop", "flip"),
        batch=n,
        image_size=(height, width),
        crop_shift=torch.tensor(shifts),
        flip=flip,
    )
    leaf = x.clone().requires_grad_(True)
    out = diff_augment(leaf, params, backend="cpp")
    (grad,) = torch.autograd.grad(out, leaf, upstream)
    expected_grad = reference_and_grad(x, params, upstream)[1]
    for i, (dr, dc) in enumerate(shifts):
        image = x[i]
        expected = crop_flip_by_hand(image, dr, dc, flip_first) if flip[i] else shifted_by_hand(image, dr, dc)
        assert torch.equal(out[i], expected), (i, dr, dc)
    assert torch.equal(grad, expected_grad)
    for i in range(n):  # the same transforms shared by a batch of one
        one = AugmentParams(
            families=params.families,
            batch=1,
            image_size=(height, width),
            crop_shift=params.crop_shift[i : i + 1],
            flip=params.flip[i : i + 1],
        )
        assert torch.equal(diff_augment(x[i : i + 1], one, backend="cpp"), out[i : i + 1])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", ["shared", "per-image"])
@pytest.mark.parametrize("strategy", ["crop", "flip_crop", "scale", "rotate", "crop_flip_scale_rotate"])
def test_cpp_non_finite_values_outside_the_sampled_region_stay_out(strategy, batch, dtype):
    # Input pixels no output reads, and output pixels that read nothing, may hold inf or NaN without reaching the
    # result: the kernels select zero-weight taps out instead of multiplying them by 0.
    shape = (3, 3, 12, 11)
    config = AugmentConfig(crop_ratio=0.3, scale_ratio=1.4, rotate_degrees=30.0, flip_probability=0.5)
    params = sample_augment_params(
        1 if batch == "shared" else shape[0], shape[2:], strategy=strategy, mode="M", generator=seeded(83),
        config=config,
    )
    x = torch.randn(*shape, dtype=dtype, generator=seeded(81))
    upstream = torch.randn(*shape, dtype=dtype, generator=seeded(82))
    ones = torch.ones(*shape, dtype=torch.float64, requires_grad=True)
    reads = diff_augment(ones, params, backend="reference")
    (used,) = torch.autograd.grad(reads, ones, torch.ones_like(reads))
    unread, empty = used == 0, reads.detach() == 0
    assert unread.any() or empty.any()
    poison = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype).repeat(x.numel() // 3 + 1)[: x.numel()]
    poisoned_x = torch.where(unread, poison.view(shape), x)
    poisoned_upstream = torch.where(empty, poison.view(shape), upstream)
    clean_upstream = torch.where(empty, torch.zeros_like(upstream), upstream)
    expected, expected_grad = reference_and_grad(torch.where(unread, 0.0, x), params, clean_upstream)
    leaf = poisoned_x.clone().requires_grad_(True)
    out = diff_augment(leaf, params, backend="cpp")
    (grad,) = torch.autograd.grad(out, leaf, poisoned_upstream)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_without_avx512_matches_reference(capability):
    # The float32 permute/register kernels run only where the CPU has AVX-512, and ATEN_CPU_CAPABILITY caps that
    # choice once per process: the fallback loops are checked here in fresh processes.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
               "cpp_float32_forward_and_gradient or extreme_shifts or non_finite_values_outside"]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
