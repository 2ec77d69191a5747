"""fastdd.models.conv.conv2d against F.conv2d (the oracle) in float64, at first, second and third order."""

import pytest
import torch
import torch.nn.functional as F

from fastdd.models.conv import conv2d

GEOMETRIES = [
    dict(stride=1, padding=1, dilation=1, groups=1),
    dict(stride=2, padding=(1, 2), dilation=1, groups=2),
    dict(stride=1, padding=3, dilation=2, groups=1),
    dict(stride=(1, 2), padding=0, dilation=(2, 1), groups=3),
]


def _inputs(groups: int, bias: bool, seed: int = 0, size: tuple[int, int, int, int] = (3, 6, 9, 7)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6 // groups, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


def _derivatives(conv, x, w, b, geometry, order: int):
    """Forward value, then every derivative up to ``order`` of a fixed nonlinear function of the gradients."""
    leaves = [t for t in (x, w, b) if t is not None]
    y = conv(x, w, b, **geometry)
    out = [y]
    scalar = (y.sin() * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()
    for _ in range(order):
        grads = torch.autograd.grad(scalar, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        out.extend(grads)
        scalar = sum((g.cos() * (1 + k)).sum() for k, g in enumerate(grads))
    return out


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_conv2d_up_to_third_order(geometry, bias):
    x, w, b = _inputs(geometry["groups"], bias)
    ours = _derivatives(conv2d, x, w, b, geometry, order=3)
    oracle = _derivatives(F.conv2d, x, w, b, geometry, order=3)
    for a, e in zip(ours, oracle):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
def test_gradcheck_and_gradgradcheck(geometry):
    x, w, b = _inputs(geometry["groups"], True, seed=1, size=(2, 6, 6, 5))

    def f(x, w, b):
        return conv2d(x, w, b, **geometry)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_only_the_asked_gradients_are_computed():
    x, w, b = _inputs(1, True)
    y = conv2d(x.detach(), w, b, padding=1)
    (gw,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    (hx,) = torch.autograd.grad(gw.square().sum(), w)
    y_ref = F.conv2d(x.detach(), w, b, padding=1)
    (gw_ref,) = torch.autograd.grad(y_ref.square().sum(), w, create_graph=True)
    (hx_ref,) = torch.autograd.grad(gw_ref.square().sum(), w)
    torch.testing.assert_close(hx, hx_ref)


def test_string_padding_is_refused():
    x, w, b = _inputs(1, True)
    with pytest.raises(ValueError, match="numeric paddings"):
        conv2d(x, w, b, padding="same")


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_plain_backward_matches_f_conv2d(geometry):
    # Without create_graph the backward is one fused kernel call (bias included); with it, the twice-differentiable
    # path. Both must give F.conv2d's gradients.
    x, w, b = _inputs(geometry["groups"], True, seed=2)
    upstream = torch.randn(conv2d(x, w, b, **geometry).shape, dtype=torch.float64)
    ours = torch.autograd.grad(conv2d(x, w, b, **geometry), (x, w, b), upstream)
    oracle = torch.autograd.grad(F.conv2d(x, w, b, **geometry), (x, w, b), upstream)
    for a, e in zip(ours, oracle):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    (only_w,) = torch.autograd.grad(conv2d(x, w, b, **geometry), w, upstream)
    torch.testing.assert_close(only_w, oracle[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_autocast_matches_f_conv2d_under_autocast_to_second_order(bias):
    """Under torch.autocast("cpu", bfloat16) conv2d casts its float32 inputs as autocast casts F.conv2d's: the output
    is bfloat16 and the first and second derivatives reach the float32 leaves in float32. bfloat16 moves them by
    1-15 % from the float64 values (second order most), so each is held to the built-in convolution's own error
    under the same autocast: at most 1.1x it, plus 1e-3 (measured: equal to three digits)."""
    x, w, b = (None if t is None else t.detach().float().requires_grad_(True) for t in _inputs(1, bias))
    results = []
    for conv, bf16 in ((conv2d, True), (F.conv2d, True), (F.conv2d, False)):
        leaves = [t if bf16 else t.detach().double().requires_grad_(True) for t in (x, w, b) if t is not None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(leaves[0], leaves[1], leaves[2] if bias else None, padding=1)
            scalar = (y.double().sin() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum()
        grads = torch.autograd.grad(scalar, leaves, create_graph=True)
        second = torch.autograd.grad(sum((g.cos() * (1 + k)).sum() for k, g in enumerate(grads)), leaves)
        if bf16:
            assert y.dtype == torch.bfloat16
            assert all(g.dtype == torch.float32 for g in (*grads, *second))
        results.append([t.detach().double() for t in (y, *grads, *second)])
    for ours, builtin, exact in zip(*results):
        ours_error, builtin_error = ((t - exact).norm() / exact.norm() for t in (ours, builtin))
        assert ours_error <= 1.1 * builtin_error + 1e-3, (float(ours_error), float(builtin_error))
