"""Random masks of MTS / MDT: exact masked counts, channel sharing, patches, gradients, and determinism."""

import pytest
import torch

from fastdd.trust.masking import DEFAULT_MASK_PATCH, DEFAULT_MASK_RATIO, mask_like, random_mask


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(generator: torch.Generator, shape=(6, 3, 8, 8)) -> torch.Tensor:
    return 1.0 + torch.rand(shape, generator=generator)  # never 0, so a 0 means "masked"


def test_defaults_are_valid():
    assert 0 <= DEFAULT_MASK_RATIO < 1
    assert DEFAULT_MASK_PATCH >= 1


def test_exact_count_per_image_shared_over_channels(generator):
    x = _images(generator)
    out = random_mask(x, 0.3, generator=generator)
    zero = out == 0
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same pixels in every channel
    assert zero[:, 0].flatten(1).sum(dim=1).tolist() == [round(0.3 * 64)] * 6  # 19 of 64 pixels, every image
    assert torch.equal(out[~zero], x[~zero])  # the rest is untouched
    assert len({tuple(z.flatten().tolist()) for z in zero[:, 0]}) == 6  # images get their own masks


def test_ratio_zero_is_the_identity_and_draws_nothing(generator):
    x = _images(generator)
    state = generator.get_state()
    assert random_mask(x, 0.0, generator=generator) is x
    assert torch.equal(mask_like(x.shape, 0.0, generator=generator), torch.ones(6, 1, 8, 8))
    assert torch.equal(generator.get_state(), state)


def test_patches_are_masked_whole_and_cropped_at_the_border(generator):
    # 7 x 7 pixels in 2 x 2 patches: a 4 x 4 grid whose last row / column is cut to one pixel.
    mask = mask_like((5, 3, 7, 7), 0.5, generator=generator, patch=2)
    assert mask.shape == (5, 1, 7, 7)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    padded = torch.nn.functional.pad(mask, (0, 1, 0, 1), mode="replicate")  # complete the border cells
    cells = padded.unfold(2, 2, 2).unfold(3, 2, 2)  # [5, 1, 4, 4, 2, 2]
    assert torch.equal(cells.amin(dim=(-1, -2)), cells.amax(dim=(-1, -2)))  # each cell all 0 or all 1
    assert (cells[..., 0, 0] == 0).flatten(1).sum(dim=1).tolist() == [8] * 5  # round(0.5 * 16)


def test_every_pixel_is_masked_equally_often():
    mask = mask_like((4000, 1, 4, 4), 0.25, generator=_seeded(1))
    assert (mask.flatten(1) == 0).sum(dim=1).eq(4).all()
    kept = mask.mean(dim=0).flatten()
    assert torch.allclose(kept, torch.full_like(kept, 0.75), atol=0.03), kept


def test_gradient_is_the_mask_and_seeds_reproduce():
    x = _images(_seeded(2)).requires_grad_(True)
    out = random_mask(x, 0.4, generator=_seeded(3), patch=3)
    out.backward(torch.ones_like(out))
    mask = mask_like(x.shape, 0.4, generator=_seeded(3), patch=3)
    assert torch.equal(x.grad, mask.expand_as(x))
    assert torch.equal(out.detach(), x.detach() * mask)
    assert not torch.equal(mask, mask_like(x.shape, 0.4, generator=_seeded(4), patch=3))


@pytest.mark.parametrize(
    "kwargs",
    [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": 0.3, "patch": 0}, {"ratio": 0.3, "patch": 1.5}],
)
def test_bad_arguments_are_refused(generator, kwargs):
    with pytest.raises(ValueError):
        random_mask(torch.ones(2, 3, 4, 4), generator=generator, **kwargs)


def test_images_must_be_4d_floats(generator):
    with pytest.raises(ValueError):
        random_mask(torch.ones(3, 4, 4), 0.3, generator=generator)
    with pytest.raises(TypeError):
        random_mask(torch.ones(2, 3, 4, 4, dtype=torch.int64), 0.3, generator=generator)
