"""instance_norm_relu_pool's Triton kernels under TRITON_INTERPRET=1: against the unfused PyTorch chain to second
order, against the C++ ops output for output, gradcheck / gradgradcheck, and the error off CUDA without the
interpreter. The interpreter is slow, so the maps are tiny."""

import pytest
import torch
from half_precision import HALF_DTYPES, assert_norm_matches_float64_reference

from fastdd import _extension
from fastdd.ops import norm_relu_pool
from fastdd.ops._dispatch import unavailable_reason
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool, instance_norm_relu_pool_reference


def _triton_unavailable() -> str | None:
    return unavailable_reason("triton", torch.zeros(1), triton_kernel="instance_norm_relu_pool", cuda_kernel=False)


needs_triton = pytest.mark.skipif(
    _triton_unavailable() is not None, reason=f"Triton kernels unavailable: {_triton_unavailable()}"
)
needs_cpp = pytest.mark.skipif(not _extension.has_cpp(), reason=f"fastdd._C unavailable: {_extension.load_error()}")

# (N, C, H, W, pool): odd sizes drop a trailing row/column when pooling; 1x1 maps and odd maps without pooling.
CASES = [(2, 3, 5, 6, True), (1, 2, 4, 4, False), (1, 2, 3, 5, True), (2, 2, 3, 5, False), (2, 1, 1, 1, False)]


def _inputs(n, c, h, w, generator, dtype=torch.float64):
    x = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    weight = torch.randn(c, generator=generator, dtype=dtype)
    bias = torch.randn(c, generator=generator, dtype=dtype) * 0.5
    return [t.requires_grad_(True) for t in (x, weight, bias)]


def _triton(pool):
    return lambda x, w, b: instance_norm_relu_pool(x, w, b, pool=pool, backend="triton")


def _reference(pool):
    return lambda x, w, b: instance_norm_relu_pool_reference(x, w, b, pool=pool)


def _first_and_second_order(fn, x, weight, bias, generator):
    """y, (grad_x, grad_weight, grad_bias) for a random grad_y, and the gradient of a random linear function of
    those w.r.t. (x, weight, bias, grad_y)."""
    y = fn(x, weight, bias)
    grad_y = torch.randn(y.shape, generator=generator, dtype=y.dtype).requires_grad_(True)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
    probes = [torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in grads]
    directional = sum((g * p).sum() for g, p in zip(grads, probes))
    second = torch.autograd.grad(directional, (x, weight, bias, grad_y), allow_unused=True)
    return y, grads, second


def _assert_close_or_both_zero(got, expected, **tol):
    """bias enters the ReLU mask only, so its second-order gradient is zero (None from either side)."""
    if got is None and expected is None:
        return
    got = torch.zeros_like(expected) if got is None else got
    expected = torch.zeros_like(got) if expected is None else expected
    torch.testing.assert_close(got, expected, **tol)


@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_to_second_order(case, dtype, generator):
    *shape, pool = case
    if dtype == torch.float32 and shape[2] * shape[3] == 1:
        pytest.skip("a 1x1 map has zero variance: rstd = 1/sqrt(eps) magnifies float32 rounding of the reference")
    x, weight, bias = _inputs(*shape, generator, dtype)
    seed = int(torch.randint(1 << 30, (1,), generator=generator))
    got, expected = (
        _first_and_second_order(fn, x, weight, bias, torch.Generator().manual_seed(seed))
        for fn in (_triton(pool), _reference(pool))
    )
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    (y, grads, second), (y_ref, grads_ref, second_ref) = got, expected
    torch.testing.assert_close(y, y_ref, **tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)
    for g, g_ref in zip(second, second_ref):
        _assert_close_or_both_zero(g, g_ref, **tol)


@needs_triton
def test_maps_of_several_blocks_match_reference_to_second_order(generator, monkeypatch):
    monkeypatch.setattr(norm_relu_pool._triton_kernels(), "MAX_BLOCK", 16)
    for *shape, pool in [(2, 3, 9, 11, True), (1, 2, 6, 7, False)]:
        x, weight, bias = _inputs(*shape, generator)
        seed = int(torch.randint(1 << 30, (1,), generator=generator))
        got, expected = (
            _first_and_second_order(fn, x, weight, bias, torch.Generator().manual_seed(seed))
            for fn in (_triton(pool), _reference(pool))
        )
        (y, grads, second), (y_ref, grads_ref, second_ref) = got, expected
        for g, e in zip((y, *grads), (y_ref, *grads_ref)):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-10)
        for g, e in zip(second, second_ref):
            _assert_close_or_both_zero(g, e, atol=1e-12, rtol=1e-10)


@needs_triton
@needs_cpp
@pytest.mark.parametrize("case", [(2, 3, 5, 6, True), (2, 2, 3, 5, False), (1, 2, 7, 9, True)])
@pytest.mark.parametrize("max_block", [None, 8])
def test_launchers_match_the_cpp_ops(case, max_block, generator, monkeypatch):
    """The three launchers return what the three ``torch.ops.fastdd`` ops do, mean and rstd included, with every
    cotangent of the double backward given or missing. ``max_block`` 8 sweeps each map in several blocks, the path
    of maps larger than ``MAX_BLOCK`` (64 x 64 and up on a GPU)."""
    kernels = norm_relu_pool._triton_kernels()
    if max_block is not None:
        monkeypatch.setattr(kernels, "MAX_BLOCK", max_block)
    ops = torch.ops.fastdd
    *shape, pool = case
    x, weight, bias = (t.detach() for t in _inputs(*shape, generator))
    tol = {"atol": 1e-13, "rtol": 1e-12}
    forward = kernels.instance_norm_relu_pool_forward(x, weight, bias, 1e-5, pool)
    forward_cpp = ops.instance_norm_relu_pool(x, weight, bias, 1e-5, pool)
    for got, expected in zip(forward, forward_cpp):
        torch.testing.assert_close(got, expected, **tol)
    _, mean, rstd = forward_cpp
    grad_y = torch.randn(forward_cpp[0].shape, generator=generator, dtype=x.dtype)
    saved = (grad_y, x, weight, bias, mean, rstd)
    for got, expected in zip(
        kernels.instance_norm_relu_pool_backward(*saved, pool), ops.instance_norm_relu_pool_backward(*saved, pool)
    ):
        torch.testing.assert_close(got, expected, **tol)
    cotangents = [torch.randn(t.shape, generator=generator, dtype=x.dtype) for t in (x, weight, bias)]
    for present in ((True, True, True), (False, True, False), (True, False, True)):
        gg = [t if keep else None for t, keep in zip(cotangents, present)]
        got = kernels.instance_norm_relu_pool_double_backward(*saved, *gg, pool)
        expected = ops.instance_norm_relu_pool_double_backward(*saved, *gg, pool)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tol)


@needs_triton
def test_gradcheck_and_gradgradcheck(generator):
    for pool, shape in ((True, (1, 2, 5, 4)), (False, (1, 2, 3, 3))):
        inputs = _inputs(*shape, generator)
        assert torch.autograd.gradcheck(_triton(pool), inputs)
        assert torch.autograd.gradgradcheck(_triton(pool), inputs)


@needs_triton
def test_partial_second_order_gradients(generator):
    """Only grad_weight is differentiated again (no cotangent for grad_x): the double backward gets zeros there."""
    x, weight, bias = _inputs(2, 3, 4, 5, generator)
    out = []
    for fn in (_triton(True), _reference(True)):
        y = fn(x, weight, bias)
        _, grad_weight, _ = torch.autograd.grad(y.square().sum(), (x, weight, bias), create_graph=True)
        out.append(torch.autograd.grad(grad_weight.sum(), (x, weight)))
    for got, expected in zip(*out):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@needs_triton
def test_non_contiguous_input(generator):
    x, weight, bias = _inputs(2, 3, 4, 6, generator)
    channels_last = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    expected = instance_norm_relu_pool_reference(x, weight, bias)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    got = instance_norm_relu_pool(channels_last, weight, bias, backend="triton")
    (got_grad,) = torch.autograd.grad(got.sum(), channels_last)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-12, rtol=1e-10)


def test_auto_keeps_cpp_on_cpu():
    """Under the interpreter triton can run CPU tensors, but auto picks it for CUDA tensors only."""
    expected = "cpp" if _extension.has_cpp() else "reference"
    assert norm_relu_pool.resolve_backend("auto", torch.zeros(1, 2, 4, 4)) == expected


def test_triton_needs_cuda_or_interpreter(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, bias = _inputs(1, 2, 4, 4, generator)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: Triton kernels need CUDA tensors"):
        instance_norm_relu_pool(x, weight, bias, backend="triton")


@needs_triton
def test_third_derivative_raises_instead_of_dropping_a_term(generator):
    x, weight, bias = _inputs(1, 2, 4, 4, generator)
    y = _triton(True)(x, weight, bias)
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad((h**2).sum(), x)


@needs_triton
@pytest.mark.parametrize("params", ["float32", "x's dtype"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", [(2, 3, 5, 6, True), (1, 2, 3, 5, False)])
def test_half_precision_matches_float64_reference_to_second_order(case, dtype, params, generator):
    """bfloat16 / float16 x, parameters float32 (autocast) or x's dtype: forward, backward and double backward
    against the float64 reference on the same values, tolerances of tests/half_precision.py."""
    *shape, pool = case
    params_dtype = torch.float32 if params == "float32" else dtype
    assert_norm_matches_float64_reference(_triton(pool), shape, pool, dtype, params_dtype, generator)
