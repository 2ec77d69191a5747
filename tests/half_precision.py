"""What the half-precision tests of every op share: the dtypes, inputs rounded to them, and the stated tolerances.

Every op computes bfloat16 / float16 inputs in float32 and rounds each result to the input's dtype once, so a test
rounds its random inputs to the dtype first, runs the float64 reference on those very values (upcast), and allows
per rounding two units of roundoff u relative (u = 2^-8 for bfloat16, which keeps 8 significant bits, about 3
decimal digits; u = 2^-11 for float16, 11 bits): one u for the rounding itself and one for the float32 arithmetic
before it, whose own error is some 1e-7 relative. The absolute part, 1e-5, covers values that cancel to about 0,
where the float32 error of the terms (magnitudes of order 1) is all there is. Computing in the half dtype instead
(statistics or sums accumulated in bfloat16) misses these bounds by several u.
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
ABSOLUTE_TOLERANCE = 1e-5


def tolerance(dtype: torch.dtype, roundings: int = 1) -> dict[str, float]:
    """``assert_close`` keywords for a result of ``dtype`` that went through ``roundings`` roundings to it (a product
    of two rounded values, such as a gradient times a rounded weight, counts two); float32 and float64 results
    (e.g. the gradient of a float32 parameter) are held to float32 precision."""
    if dtype not in UNIT_ROUNDOFF:
        return {"rtol": 1e-5, "atol": ABSOLUTE_TOLERANCE}
    return {"rtol": 2 * roundings * UNIT_ROUNDOFF[dtype], "atol": ABSOLUTE_TOLERANCE}


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and given back in float64: the exact values a ``dtype`` input holds."""
    return t.to(dtype).double()


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, roundings: int = 1):
    """``got`` (of ``dtype``) is within the stated tolerance of the float64 ``expected``."""
    assert got.dtype == dtype, f"expected a {dtype} result, got {got.dtype}"
    torch.testing.assert_close(got.double(), expected.double(), **tolerance(dtype, roundings))


def norm_inputs(n, c, h, w, dtype, params_dtype, generator):
    """instance_norm_relu_pool's (x [n, c, h, w] of ``dtype``, weight, bias [c] of ``params_dtype``), and the same
    values in float64 (the reference's inputs)."""
    exact = [
        rounded(torch.randn(n, c, h, w, generator=generator, dtype=torch.float64), dtype),
        rounded(torch.randn(c, generator=generator, dtype=torch.float64), params_dtype),
        rounded(torch.randn(c, generator=generator, dtype=torch.float64) * 0.5, params_dtype),
    ]
    return [t.to(d) for t, d in zip(exact, (dtype, params_dtype, params_dtype))], exact


def derivatives_with(fn, inputs, grad_y, probes):
    """y = fn(*inputs), the gradients of <y, grad_y> w.r.t. the inputs, and the gradients of <those gradients,
    probes> w.r.t. the inputs and grad_y (None where one is identically zero). grad_y and the probes are float64
    values that every dtype involved holds exactly; they are cast to the dtypes of y and of the gradients."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    y = fn(*inputs)
    grad_y = grad_y.to(y.dtype).requires_grad_(True)
    grads = torch.autograd.grad(y, inputs, grad_y, create_graph=True)
    directional = sum((g * p.to(g.dtype)).sum() for g, p in zip(grads, probes))
    second = torch.autograd.grad(directional, (*inputs, grad_y), allow_unused=True)
    return y, grads, second


def assert_norm_matches_float64_reference(fn, shape, pool, dtype, params_dtype, generator):
    """``fn(x, weight, bias)``, an instance_norm_relu_pool backend, on x of ``shape`` in ``dtype`` and parameters of
    ``params_dtype``: y, its gradients and the second-order gradients (w.r.t. x, weight, bias and grad_y) have the
    dtypes of what they belong to and are within ``tolerance`` of the float64 reference on the same values."""
    from fastdd.ops.norm_relu_pool import instance_norm_relu_pool_reference

    inputs, exact = norm_inputs(*shape, dtype, params_dtype, generator)
    n, c, h, w = shape
    grad_y = rounded(torch.randn((n, c, h // 2, w // 2) if pool else (n, c, h, w), generator=generator,
                                 dtype=torch.float64), dtype)
    probes = [rounded(torch.randn(t.shape, generator=generator, dtype=torch.float64), t.dtype) for t in inputs]
    y, grads, second = derivatives_with(fn, inputs, grad_y, probes)
    y_ref, grads_ref, second_ref = derivatives_with(
        lambda x, w, b: instance_norm_relu_pool_reference(x, w, b, pool=pool), exact, grad_y, probes
    )
    assert_close_to_reference(y, y_ref, dtype)
    for got, expected, t in zip(grads, grads_ref, inputs):  # grad_x in x's dtype, grad_weight/bias in theirs
        assert_close_to_reference(got, expected, t.dtype)
    # d/dx, d/dweight, d/dbias (zero: bias enters the ReLU mask only), d/dgrad_y, each in its input's dtype
    for got, expected, like in zip(second, second_ref, (*inputs, y)):
        if got is None or expected is None:
            assert (got is None or not got.any()) and (expected is None or not expected.any())
            continue
        assert_close_to_reference(got, expected, like.dtype)
