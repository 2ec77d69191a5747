"""cluster_cvar / group_cvar_loss: every backend against the float64 reference, ties, NaNs, gradients, opcheck."""

import math

import pytest
import torch
from half_precision import HALF_DTYPES, assert_close_to_reference, rounded

from fastdd import _extension
from fastdd.ops import cluster_cvar, group_cvar_loss
from fastdd.ops import cvar as cvar_module
from fastdd.ops.cvar import cluster_cvar_reference, cluster_cvar_weight_reference, tail_size

needs_triton = pytest.mark.skipif(
    cvar_module._triton_kernels()[0] is None,
    reason=f"Triton kernels unavailable: {cvar_module._triton_kernels()[1]}",
)
TRITON = pytest.param("triton", marks=needs_triton)
COMPILED_BACKENDS = ["cpp", TRITON]

# (N, G): odd sizes, empty clusters, one cluster, more clusters than samples, several Triton blocks, no samples.
SHAPES = [(37, 5), (1, 1), (9, 20), (130, 3), (0, 4)]
ALPHAS = [0.8, 0.5, 1.0, 0.7, 0.01]


def _problem(n, g, generator, dtype=torch.float64):
    losses = torch.rand(n, generator=generator, dtype=dtype) * 3
    assign = torch.randint(0, g, (n,), generator=generator)
    return losses, assign


def _definition(losses, assign, num_clusters, alpha):
    """The CVaR written out in Python: per cluster, the mean of the ceil(alpha * n) largest values."""
    out = []
    for g in range(num_clusters):
        values = sorted((float(v) for v, a in zip(losses, assign) if int(a) == g), reverse=True)
        if not values:
            out.append(0.0)
            continue
        k = max(1, math.ceil(round(alpha * len(values), 9)))
        out.append(sum(values[:k]) / k)
    return torch.tensor(out, dtype=torch.float64)


def test_tail_size_rule():
    assert tail_size(10, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floating point
    assert tail_size(10, 0.8) == 8 and tail_size(3, 0.8) == 3 and tail_size(7, 0.5) == 4
    assert tail_size(5, 0.01) == 1 and tail_size(4, 1.0) == 4


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_definition(shape, alpha, generator):
    losses, assign = _problem(*shape, generator)
    expected = _definition(losses, assign, shape[1], alpha)
    torch.testing.assert_close(cluster_cvar_reference(losses, assign, shape[1], alpha), expected)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("alpha", [0.8, 0.7, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference_float64(backend, shape, alpha, generator):
    losses, assign = _problem(*shape, generator)
    losses.requires_grad_(True)
    result = cluster_cvar(losses, assign, shape[1], alpha, backend=backend)
    expected = cluster_cvar_reference(losses, assign, shape[1], alpha)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    if shape[0]:
        upstream = torch.randn(shape[1], generator=generator, dtype=torch.float64)
        (grad,) = torch.autograd.grad((result * upstream).sum(), losses)
        (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), losses)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON])
def test_ties_pick_the_lower_index_and_nan_counts_as_largest(backend):
    losses = torch.tensor([1.0, 2.0, 2.0, 2.0, float("nan"), 0.5, float("nan")], dtype=torch.float64)
    assign = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    # Cluster 0 (4 members, k = 2 at alpha 0.5): the two 2.0s with the lowest indices, 1 and 2.
    # Cluster 1 (3 members, k = 2): both NaNs, so the CVaR is NaN.
    losses.requires_grad_(True)
    result = cluster_cvar(losses, assign, 2, 0.5, backend=backend)
    assert result[0].item() == 2.0 and math.isnan(result[1].item())
    (grad,) = torch.autograd.grad(result[0], losses)
    assert grad.tolist() == [0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    (grad,) = torch.autograd.grad(cluster_cvar(losses, assign, 2, 0.5, backend=backend)[1], losses)
    assert grad.tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backend_matches_reference_float32(backend, generator):
    losses, assign = _problem(37, 5, generator, torch.float32)
    torch.testing.assert_close(
        cluster_cvar(losses, assign, 5, 0.8, backend=backend), cluster_cvar_reference(losses, assign, 5, 0.8)
    )


# bfloat16 / float16 losses: compared as they are (rounding to the dtype makes ties, which every backend breaks by
# index, as the reference on the same values does), summed in float32, the CVaR rounded once; the gradient is the
# upstream gradient times the weight 1 / k, both rounded, and the product rounded again: two roundings. Tolerances of
# tests/half_precision.py (two units of roundoff per rounding, 1e-5 absolute) against the float64 reference.
@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape, alpha", [((37, 5), 0.8), ((130, 3), 0.7), ((9, 20), 0.5)])
def test_half_precision_matches_float64_reference(backend, dtype, shape, alpha, generator):
    losses, assign = _problem(*shape, generator)
    losses = rounded(losses, dtype).requires_grad_(True)
    upstream = rounded(torch.randn(shape[1], generator=generator, dtype=torch.float64), dtype)
    expected = cluster_cvar_reference(losses, assign, shape[1], alpha)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), losses)
    half = losses.detach().to(dtype).requires_grad_(True)
    result = cluster_cvar(half, assign, shape[1], alpha, backend=backend)
    assert_close_to_reference(result, expected, dtype)
    (grad,) = torch.autograd.grad((result * upstream.to(dtype)).sum(), half)
    assert_close_to_reference(grad, expected_grad, dtype, roundings=2)


@pytest.mark.parametrize("backend", ["reference", "cpp", TRITON])
def test_non_contiguous_inputs(backend, generator):
    losses, assign = _problem(40, 4, generator)
    strided_losses, strided_assign = losses[::2], assign[::2]
    assert not strided_losses.is_contiguous()
    torch.testing.assert_close(
        cluster_cvar(strided_losses, strided_assign, 4, 0.8, backend=backend),
        cluster_cvar_reference(strided_losses.contiguous(), strided_assign.contiguous(), 4, 0.8),
    )


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck(backend, generator):
    # Distinct losses: the selection is locally constant, so the CVaR is differentiable there.
    losses = torch.randperm(23, generator=generator).double().div(7).requires_grad_(True)
    assign = torch.randint(0, 4, (23,), generator=generator)
    assert torch.autograd.gradcheck(lambda x: cluster_cvar(x, assign, 4, 0.8, backend=backend), (losses,))
    assert torch.autograd.gradgradcheck(lambda x: cluster_cvar(x, assign, 4, 0.8, backend=backend), (losses,))


@pytest.mark.skipif(not _extension.has_cpp(), reason="fastdd._C not built")
def test_weights_are_the_gradient(generator):
    losses, assign = _problem(37, 5, generator)
    weight = cluster_cvar_weight_reference(losses, assign, 5, 0.8)
    _, kernel_weight = torch.ops.fastdd.cluster_cvar(losses, assign, 5, 0.8)
    torch.testing.assert_close(kernel_weight, weight, rtol=0, atol=0)
    leaf = losses.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cluster_cvar_reference(leaf, assign, 5, 0.8).sum(), leaf)
    torch.testing.assert_close(grad, weight)


@pytest.mark.skipif(not _extension.has_cpp(), reason="fastdd._C not built")
def test_opcheck(generator):
    losses, assign = _problem(19, 3, generator)
    torch.library.opcheck(torch.ops.fastdd.cluster_cvar.default, (losses.requires_grad_(True), assign, 3, 0.8))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_group_cvar_loss_is_mean_plus_max_of_occupied_clusters(backend, generator):
    losses, assign = _problem(30, 6, generator)
    assign[assign == 2] = 0  # cluster 2 empty: it must not pull the mean down
    cvar = cluster_cvar_reference(losses, assign, 6, 0.8)
    occupied = cvar[torch.bincount(assign, minlength=6) > 0]
    expected = occupied.mean() + occupied.max()
    torch.testing.assert_close(group_cvar_loss(losses, assign, 6, 0.8, backend=backend), expected)
    # Its gradient (computed without indexing the occupied clusters) is that of the indexed formula.
    leaf = losses.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(group_cvar_loss(leaf, assign, 6, 0.8, backend=backend), leaf)
    reference_leaf = losses.detach().requires_grad_(True)
    cvar = cluster_cvar_reference(reference_leaf, assign, 6, 0.8)
    present = cvar[torch.bincount(assign, minlength=6) > 0]
    (expected_grad,) = torch.autograd.grad(present.mean() + present.max(), reference_leaf)
    torch.testing.assert_close(grad, expected_grad)
    empty = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    assert group_cvar_loss(empty, torch.zeros(0, dtype=torch.int64), 3).item() == 0.0
    (empty_grad,) = torch.autograd.grad(group_cvar_loss(empty, torch.zeros(0, dtype=torch.int64), 3), empty)
    assert empty_grad.shape == (0,)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.ones(3, 1), torch.zeros(3, dtype=torch.int64), 2, 0.8), ValueError, "losses \\[N\\]"),
        ((torch.ones(3), torch.zeros(3), 2, 0.8), TypeError, "int64"),
        ((torch.ones(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), 2, 0.8), TypeError, "floating"),
        ((torch.ones(3), torch.zeros(3, dtype=torch.int64), 0, 0.8), ValueError, "num_clusters"),
        ((torch.ones(3), torch.zeros(3, dtype=torch.int64), 2, 0.0), ValueError, "alpha"),
        ((torch.ones(3), torch.tensor([0, 2, 1]), 2, 0.8), ValueError, "assign values"),
    ],
)
def test_bad_input_is_one_clear_error(args, error, match):
    with pytest.raises(error, match=match):
        cluster_cvar(*args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="valid backends"):
        cluster_cvar(torch.ones(2), torch.zeros(2, dtype=torch.int64), 1, backend="fast")
