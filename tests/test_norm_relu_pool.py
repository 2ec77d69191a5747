"""instance_norm_relu_pool: the fused C++ op against the unfused PyTorch chain, to second order, and in ConvNet."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from half_precision import (
    HALF_DTYPES,
    UNIT_ROUNDOFF,
    assert_norm_matches_float64_reference,
    norm_inputs,
)

from fastdd import _extension
from fastdd.models import build_model
from fastdd.models.functional import flat_parameters, functional_forward, parameter_layout
from fastdd.ops import norm_relu_pool
from fastdd.ops.norm_relu_pool import instance_norm_relu_pool, instance_norm_relu_pool_reference

pytestmark = pytest.mark.skipif(not _extension.has_cpp(), reason=f"fastdd._C unavailable: {_extension.load_error()}")

# (N, C, H, W, pool): odd sizes drop a trailing row/column when pooling, 1x1 maps without pooling; the kernels sum on
# vectors of 2 to 16 values plus a scalar tail, so maps of 117 and 144 values run several vectors, with and without
# a tail.
CASES = [
    (2, 3, 5, 7, True),
    (1, 2, 6, 6, True),
    (3, 4, 4, 5, False),
    (2, 1, 1, 1, False),
    (2, 3, 2, 3, True),
    (1, 2, 9, 13, True),
    (2, 2, 12, 12, False),
]


def _inputs(n, c, h, w, generator, dtype=torch.float64):
    x = torch.randn(n, c, h, w, generator=generator, dtype=dtype)
    weight = torch.randn(c, generator=generator, dtype=dtype)
    bias = torch.randn(c, generator=generator, dtype=dtype) * 0.5
    return [t.requires_grad_(True) for t in (x, weight, bias)]


def _first_and_second_order(fn, x, weight, bias, generator):
    """y, (grad_x, grad_weight, grad_bias) for a random grad_y, and the gradient of a random linear function of
    those w.r.t. (x, weight, bias, grad_y): every quantity trajectory matching takes from the block."""
    y = fn(x, weight, bias)
    grad_y = torch.randn(y.shape, generator=generator, dtype=y.dtype).requires_grad_(True)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
    probes = [torch.randn(g.shape, generator=generator, dtype=g.dtype) for g in grads]
    directional = sum((g * p).sum() for g, p in zip(grads, probes))
    second = torch.autograd.grad(directional, (x, weight, bias, grad_y), allow_unused=True)
    return y, grads, second


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_to_second_order(case, dtype, generator):
    *shape, pool = case
    if dtype == torch.float32 and shape[2] * shape[3] == 1:
        pytest.skip("a 1x1 map has zero variance: rstd = 1/sqrt(eps) magnifies float32 rounding of the reference")
    x, weight, bias = _inputs(*shape, generator, dtype)
    seed = int(torch.randint(1 << 30, (1,), generator=generator))
    results = []
    for fn in (
        lambda x, w, b: instance_norm_relu_pool(x, w, b, pool=pool, backend="cpp"),
        lambda x, w, b: instance_norm_relu_pool_reference(x, w, b, pool=pool),
    ):
        results.append(_first_and_second_order(fn, x, weight, bias, torch.Generator().manual_seed(seed)))
    tol = {"atol": 1e-12, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 2e-5, "rtol": 1e-4}
    (y, grads, second), (y_ref, grads_ref, second_ref) = results
    torch.testing.assert_close(y, y_ref, **tol)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, **tol)
    for got, expected in zip(second, second_ref):
        # bias enters the ReLU mask only, so its second-order gradient is zero (None from either side).
        expected = torch.zeros_like(got) if expected is None and got is not None else expected
        got = torch.zeros_like(expected) if got is None and expected is not None else got
        if got is not None:
            torch.testing.assert_close(got, expected, **tol)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_simd_copies_match_reference(capability):
    # The CPU kernels have one copy per x86-64 level (AVX-512, AVX2, SSE2) and pick the widest once per process;
    # ATEN_CPU_CAPABILITY caps the choice, so the narrower copies are checked here in fresh processes.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
               "matches_reference_to or matches_float64_reference"]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_gradcheck_and_gradgradcheck(generator):
    for pool, shape in ((True, (2, 3, 5, 4)), (False, (1, 2, 3, 3))):
        inputs = _inputs(*shape, generator)
        fn = lambda x, w, b: instance_norm_relu_pool(x, w, b, pool=pool, backend="cpp")  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


def test_partial_second_order_gradients(generator):
    """Only grad_weight is differentiated again (no cotangent for grad_x): the double backward gets None there."""
    x, weight, bias = _inputs(2, 3, 6, 6, generator)
    out = []
    for fn in (lambda *a: instance_norm_relu_pool(*a, backend="cpp"), instance_norm_relu_pool_reference):
        y = fn(x, weight, bias)
        _, grad_weight, _ = torch.autograd.grad(y.square().sum(), (x, weight, bias), create_graph=True)
        out.append(torch.autograd.grad(grad_weight.sum(), (x, weight)))
    for got, expected in zip(*out):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_non_contiguous_input(generator):
    x, weight, bias = _inputs(2, 4, 6, 8, generator)
    channels_last = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    transposed = x.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    expected = instance_norm_relu_pool_reference(x, weight, bias)
    for variant in (channels_last, transposed):
        torch.testing.assert_close(instance_norm_relu_pool(variant, weight, bias, backend="cpp"), expected)
        assert torch.autograd.gradcheck(lambda v: instance_norm_relu_pool(v, weight, bias, backend="cpp"), (variant,))


def test_opcheck(generator):
    x, weight, bias = _inputs(2, 3, 4, 6, generator)
    y, mean, rstd = torch.ops.fastdd.instance_norm_relu_pool(x, weight, bias, 1e-5, True)
    grad_y = torch.randn(y.shape, generator=generator, dtype=y.dtype, requires_grad=True)
    ops = torch.ops.fastdd
    torch.library.opcheck(ops.instance_norm_relu_pool.default, (x, weight, bias, 1e-5, True))
    saved = (x, weight, bias, mean.detach(), rstd.detach())
    torch.library.opcheck(ops.instance_norm_relu_pool_backward.default, (grad_y, *saved, True))
    gg = [torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in (x, weight, bias)]
    torch.library.opcheck(
        ops.instance_norm_relu_pool_double_backward.default,
        tuple(t.detach() for t in (grad_y, *saved)) + (*gg, True),
    )
    torch.library.opcheck(
        ops.instance_norm_relu_pool_double_backward.default,
        tuple(t.detach() for t in (grad_y, *saved)) + (None, None, None, True),
    )


def test_convnet_fused_equals_unfused_student_step(generator):
    """ConvNet's fused blocks give the nn.Sequential result, and so the same trajectory-matching quantities: the
    step gradient, and the image gradient and Hessian-vector product of <gradient, lambda>."""
    net = build_model("convnet", channels=3, num_classes=4, image_size=(9, 10), width=6, depth=2, generator=generator)
    net = net.double()
    theta = flat_parameters(net).detach().requires_grad_(True)
    images = torch.randn(5, 3, 9, 10, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1])
    lam = torch.randn(theta.shape, generator=generator, dtype=torch.float64)

    def quantities(forward):
        loss = torch.nn.functional.cross_entropy(forward(theta, images), labels)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        return (grad.detach(), *torch.autograd.grad((grad * lam).sum(), (images, theta)))

    fused = quantities(lambda t, x: functional_forward(net, t, x))
    unfused = quantities(lambda t, x: _sequential_forward(net, t, x))
    for got, expected in zip(fused, unfused):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def _sequential_forward(net, flat, x):
    """The ConvNet computed by its nn.Sequential of blocks (GroupNorm, ReLU, AvgPool2d modules), unfused."""
    params = parameter_layout(net).unflatten(flat)
    features = {name.removeprefix("features."): p for name, p in params.items() if name.startswith("features.")}
    embedding = torch.func.functional_call(net.features, features, (x,)).flatten(1)
    return torch.nn.functional.linear(embedding, params["classifier.weight"], params["classifier.bias"])


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: instance_norm_relu_pool(torch.zeros(2, 3, 4), torch.ones(3), torch.zeros(3)), r"\[N, C, H, W\]"),
        (lambda: instance_norm_relu_pool(torch.zeros(1, 3, 4, 4), torch.ones(2), torch.zeros(3)), r"weight must be \[3\]"),
        (lambda: instance_norm_relu_pool(torch.zeros(1, 3, 1, 4), torch.ones(3), torch.zeros(3)), "at least 2x2"),
        (
            lambda: instance_norm_relu_pool(torch.zeros(1, 3, 4, 4), torch.ones(3, dtype=torch.float64), torch.zeros(3)),
            "x's dtype",
        ),
        (  # float32 parameters go with half-precision x only
            lambda: instance_norm_relu_pool(
                torch.zeros(1, 3, 4, 4, dtype=torch.float64), torch.ones(3), torch.zeros(3)
            ),
            "x's dtype, got x torch.float64",
        ),
        (  # weight and bias share one dtype
            lambda: instance_norm_relu_pool(
                torch.zeros(1, 3, 4, 4, dtype=torch.bfloat16), torch.ones(3), torch.zeros(3, dtype=torch.bfloat16)
            ),
            r"or float32 for a bfloat16 or float16 x\), got x torch.bfloat16, weight torch.float32 and bias",
        ),
        (lambda: instance_norm_relu_pool(torch.zeros(1, 3, 4, 4), torch.ones(3), torch.zeros(3), backend="x"), "valid backends"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_third_derivative_raises_instead_of_dropping_a_term(generator):
    # The double-backward op is not differentiable itself: a third derivative would silently miss its term.
    x, weight, bias = _inputs(2, 3, 4, 4, generator)
    y = instance_norm_relu_pool(x, weight, bias, backend="cpp")
    (g,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad((g**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad((h**2).sum(), x)


# ---------------------------------------------------------------------------------------------- half precision
# bfloat16 / float16 x with float32 parameters (what autocast hands a ConvNet block) or parameters of x's dtype,
# against the float64 reference on the same rounded values; tolerances in tests/half_precision.py (two units of
# roundoff per rounding to the dtype, 1e-5 absolute).
HALF_CASES = [(2, 3, 5, 7, True), (1, 2, 9, 13, True), (3, 4, 4, 5, False), (2, 2, 12, 12, False)]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("params", ["float32", "x's dtype"])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("case", HALF_CASES)
def test_half_precision_matches_float64_reference_to_second_order(case, dtype, params, backend, generator):
    *shape, pool = case
    params_dtype = torch.float32 if params == "float32" else dtype
    assert_norm_matches_float64_reference(
        lambda x, w, b: instance_norm_relu_pool(x, w, b, pool=pool, backend=backend), shape, pool, dtype,
        params_dtype, generator,
    )


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_statistics_are_float32(dtype, generator):
    """mean and rstd of a half-precision x are float32 values of its exact (rounded) values, to float32 precision:
    sums accumulated in the half dtype would be off by its roundoff (u = 2^-8 or 2^-11)."""
    (x, weight, bias), (x64, _, _) = norm_inputs(3, 4, 16, 16, dtype, torch.float32, generator)
    x = x * 8 + 100  # a large mean and many terms: half-precision sums would be off by several u
    x64 = x.double()
    _, mean, rstd = torch.ops.fastdd.instance_norm_relu_pool(x, weight, bias, 1e-5, True)
    assert mean.dtype == rstd.dtype == torch.float32
    var, mean_ref = torch.var_mean(x64, dim=(2, 3), correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(rstd.double(), (var + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    assert (mean.double() - mean_ref).abs().max() < UNIT_ROUNDOFF[dtype] * mean_ref.abs().min()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_auto_picks_cpp_for_half_precision(dtype):
    assert norm_relu_pool.resolve_backend("auto", torch.zeros(1, 2, 4, 4, dtype=dtype)) == "cpp"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_opcheck(dtype, generator):
    """The three registered ops with a half-precision x and float32 parameters: schema, fake implementations (their
    float32 statistics and per-channel gradients), autograd registration."""
    (x, weight, bias), _ = norm_inputs(2, 3, 4, 6, dtype, torch.float32, generator)
    y, mean, rstd = torch.ops.fastdd.instance_norm_relu_pool(x, weight, bias, 1e-5, True)
    ops = torch.ops.fastdd
    torch.library.opcheck(ops.instance_norm_relu_pool.default, (x, weight, bias, 1e-5, True))
    grad_y = torch.randn(y.shape, generator=generator).to(dtype)
    saved = (x, weight, bias, mean, rstd)
    torch.library.opcheck(ops.instance_norm_relu_pool_backward.default, (grad_y, *saved, True))
    gg = [torch.randn(t.shape, generator=generator).to(t.dtype) for t in (x, weight, bias)]
    torch.library.opcheck(ops.instance_norm_relu_pool_double_backward.default, (grad_y, *saved, *gg, True))


def test_convnet_under_bfloat16_autocast_is_close_to_float32(generator):
    """A ConvNet forward, backward and the Hessian-vector product of trajectory matching under
    torch.autocast("cpu", bfloat16), where the convolutions hand the fused block bfloat16 maps with float32
    parameters, against the float32 run. bfloat16 convolutions alone (8 significant bits per input) move the
    gradients by 5-10 %, so the bound is relative: the fused block's errors are at most 1.2x those of the unfused
    PyTorch chain (GroupNorm, ReLU, AvgPool2d) under the same autocast (measured: 0.78-0.94x), below 0.15 relative
    and with cosines above 0.99; the logits within 2e-2."""
    net = build_model("convnet", channels=3, num_classes=10, image_size=32, width=16, generator=generator)
    theta = flat_parameters(net).detach().requires_grad_(True)
    images = torch.randn(6, 3, 32, 32, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    lam = torch.randn(theta.shape, generator=generator)

    def quantities(forward, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = forward(net, theta, images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
        image_grad, hvp = torch.autograd.grad((grad * lam).sum(), (images, theta))
        assert image_grad.dtype == hvp.dtype == torch.float32
        return [t.detach().double().flatten() for t in (logits, grad, image_grad, hvp)]

    def errors(got, expected):
        assert got.isfinite().all()
        relative = float((got - expected).norm() / expected.norm())
        return relative, float(torch.nn.functional.cosine_similarity(got, expected, dim=0))

    seen = []
    original = norm_relu_pool.instance_norm_relu_pool

    def recording(x, weight, bias, **kwargs):
        seen.append((x.dtype, weight.dtype))
        return original(x, weight, bias, **kwargs)

    import fastdd.models.convnet as convnet_module

    reference = quantities(functional_forward, False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(convnet_module, "instance_norm_relu_pool", recording)
        fused = quantities(functional_forward, True)
    assert seen and all(pair == (torch.bfloat16, torch.float32) for pair in seen), seen
    unfused = quantities(_sequential_forward, True)
    for name, got, baseline, expected in zip(("logits", "grad", "image grad", "hvp"), fused, unfused, reference):
        relative, cosine = errors(got, expected)
        baseline_relative, _ = errors(baseline, expected)
        limit = 2e-2 if name == "logits" else 0.15
        assert relative < limit and cosine > 0.99, (name, relative, cosine)
        assert relative <= 1.2 * baseline_relative, (name, relative, baseline_relative)
    # Also plain nn.Module calls (forward and backward) under autocast, as fastdd's training loops make them.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()
               for p in net.parameters())
