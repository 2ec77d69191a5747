"""nearest_synthetic: every backend against the float64 reference, with and without groups; ties, NaNs, gradients,
opcheck, dispatch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from half_precision import HALF_DTYPES, assert_close_to_reference, rounded

from fastdd import _extension
from fastdd.ops import nearest
from fastdd.ops.nearest import nearest_synthetic, nearest_synthetic_backward_reference, nearest_synthetic_reference

needs_triton = pytest.mark.skipif(
    nearest._triton_kernels()[0] is None, reason=f"Triton kernels unavailable: {nearest._triton_kernels()[1]}"
)
TRITON = pytest.param("triton", marks=needs_triton)
COMPILED_BACKENDS = ["cpp", TRITON]

# (N, M, D): odd sizes, row-tile remainders, several Triton tiles along M and D, a single center, no points.
SHAPES = [(37, 5, 13), (1, 1, 1), (6, 19, 21), (33, 17, 3), (4, 1, 40), (0, 3, 4)]


def _random(shape, generator, dtype=torch.float64):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def _brute_force(points, centers):
    """The definition, all at once: [N, M] exact squared distances in float64."""
    sq = (points.double()[:, None, :] - centers.double()[None, :, :]).square().sum(dim=2)
    return sq.argmin(dim=1), sq.min(dim=1).values


def test_extension_loaded():
    assert _extension.has_cpp(), f"fastdd._C failed to load: {_extension.load_error()}"
    assert _extension.load_error() is None


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_definition(shape, generator):
    n, m, d = shape
    points, centers = _random((n, d), generator), _random((m, d), generator)
    index, sq_dist = nearest_synthetic_reference(points, centers)
    expected_index, expected_dist = _brute_force(points, centers)
    assert index.dtype == torch.int64 and index.shape == (n,) and sq_dist.shape == (n,)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference_float64(backend, shape, generator):
    n, m, d = shape
    points, centers = _random((n, d), generator), _random((m, d), generator)
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    expected_index, expected_dist = nearest_synthetic_reference(points, centers)
    assert index.dtype == torch.int64 and sq_dist.dtype == torch.float64
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backend_matches_reference_float32(backend, generator):
    points, centers = _random((37, 13), generator, torch.float32), _random((5, 13), generator, torch.float32)
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    expected_index, expected_dist = _brute_force(points, centers)
    assert sq_dist.dtype == torch.float32
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist.float(), rtol=1e-5, atol=1e-5)


def test_cpp_realistic_size_float32(generator):
    # Large D exercises the vectorised loops, the center blocking and both threads.
    points, centers = _random((203, 2048), generator, torch.float32), _random((100, 2048), generator, torch.float32)
    index, sq_dist = nearest_synthetic(points, centers, backend="cpp")
    expected_index, expected_dist = _brute_force(points, centers)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_non_contiguous_inputs(backend, generator):
    points = _random((13, 37), generator).t()  # [37, 13], transposed view
    centers = _random((10, 39), generator)[::2, ::3]  # [5, 13], strided view
    assert not points.is_contiguous() and not centers.is_contiguous()
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    expected_index, expected_dist = nearest_synthetic_reference(points.contiguous(), centers.contiguous())
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_ties_resolve_to_lowest_index(backend):
    # Small integers: every distance is exact, so the ties below are real ties in every backend.
    centers = torch.tensor([[0.0, 5.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -1.0]], dtype=torch.float64)
    # Hand-computed: (0,0) is at 1 from centers 1, 2, 3, 4; (1,0) sits on centers 1 and 3; (0,3) is at 4 from 0 and 4;
    # (0,-1) is at 2 from 1, 2, 3.
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    assert index.tolist() == [1, 1, 2, 0, 1]
    assert sq_dist.tolist() == [1.0, 0.0, 0.0, 4.0, 2.0]


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_duplicate_centers_across_tiles_pick_first(backend, generator):
    # 24 centers span two Triton center tiles; the nearest one is duplicated at 3 and 20.
    centers = torch.randint(-4, 5, (24, 6), generator=generator).double() * 10
    centers[20] = centers[3]
    points = centers[3] + torch.randint(-1, 2, (9, 6), generator=generator).double()
    index, _ = nearest_synthetic(points, centers, backend=backend)
    assert index.tolist() == [3] * 9


def test_cpp_ties_across_center_blocks():
    # With D = 40000 doubles each center fills a whole cache block, so tied centers land in different blocks.
    dim = 40000
    centers = torch.zeros(3, dim, dtype=torch.float64)
    centers[0] = 3.0
    centers[1, : dim // 2] = 1.0
    centers[2, dim // 2 :] = 1.0  # centers 1 and 2 are equally far from the origin-centred points below
    points = torch.zeros(5, dim, dtype=torch.float64)
    index, sq_dist = nearest_synthetic(points, centers, backend="cpp")
    assert index.tolist() == [1] * 5
    assert sq_dist.tolist() == [dim / 2] * 5


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_nan_distances_win_like_torch_argmin(backend, generator):
    points, centers = _random((6, 5), generator), _random((4, 5), generator)
    points[2, 1] = float("nan")  # every distance of point 2 is NaN -> center 0
    centers[3, 0] = float("nan")  # distance to center 3 is NaN for everyone -> center 3 (first NaN)
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    expected_index, expected_dist = nearest_synthetic_reference(points, centers)
    assert expected_index.tolist() == [3, 3, 0, 3, 3, 3]
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    assert torch.isnan(sq_dist).all() and torch.isnan(expected_dist).all()


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_single_center(backend, generator):
    points, centers = _random((11, 7), generator), _random((1, 7), generator)
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    assert index.tolist() == [0] * 11
    torch.testing.assert_close(sq_dist, (points - centers).square().sum(dim=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck(backend, generator):
    points = _random((9, 4), generator).requires_grad_()
    centers = _random((3, 4), generator).requires_grad_()  # 9 points on 3 centers: shared centers accumulate
    assert torch.autograd.gradcheck(lambda p, c: nearest_synthetic(p, c, backend=backend)[1], (points, centers))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradgradcheck(backend, generator):
    points = _random((9, 4), generator).requires_grad_()
    centers = _random((3, 4), generator).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda p, c: nearest_synthetic(p, c, backend=backend)[1], (points, centers))


def test_cpp_third_derivative_equals_reference(generator):
    """The compiled backward op has its own derivative, so higher orders are exact, not silently zero."""
    points, centers = _random((11, 5), generator), _random((4, 5), generator)

    def third(backend: str) -> torch.Tensor:
        p, c = points.clone().requires_grad_(), centers.clone().requires_grad_()
        gp, gc = torch.autograd.grad(nearest_synthetic(p, c, backend=backend)[1].pow(2).sum(), (p, c),
                                     create_graph=True)
        ggp = torch.autograd.grad(gp.sin().sum() + gc.cos().sum(), p, create_graph=True)[0]
        return torch.autograd.grad(ggp.square().sum(), (p, c))

    for ours, reference in zip(third("cpp"), third("reference")):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_match_reference(backend, dtype, generator):
    points = _random((37, 13), generator, dtype).requires_grad_()
    centers = _random((5, 13), generator, dtype).requires_grad_()
    weight = _random((37,), generator, dtype)
    index, sq_dist = nearest_synthetic(points, centers, backend=backend)
    assert not index.requires_grad and sq_dist.requires_grad
    grads = torch.autograd.grad((sq_dist * weight).sum(), (points, centers))
    _, expected_dist = nearest_synthetic_reference(points, centers)
    expected = torch.autograd.grad((expected_dist * weight).sum(), (points, centers))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_backward_formula_by_hand():
    points = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]], dtype=torch.float64)
    centers = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    index = torch.tensor([0, 0, 1])
    grad = torch.tensor([1.0, 5.0, 0.5], dtype=torch.float64)
    # grad_points = 2 g (p - c_index); grad_centers[j] = -(sum of grad_points of the points assigned to j).
    want_points = torch.tensor([[2.0, 4.0], [0.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    want_centers = torch.tensor([[-2.0, -4.0], [0.0, 1.0]], dtype=torch.float64)
    for backward in (nearest_synthetic_backward_reference, torch.ops.fastdd.nearest_synthetic_backward):
        grad_points, grad_centers = backward(grad, points, centers, index)
        torch.testing.assert_close(grad_points, want_points, rtol=0, atol=0)
        torch.testing.assert_close(grad_centers, want_centers, rtol=0, atol=0)


def test_only_points_require_grad(generator):
    points = _random((8, 3), generator).requires_grad_()
    centers = _random((2, 3), generator)
    _, sq_dist = nearest_synthetic(points, centers, backend="cpp")
    sq_dist.sum().backward()
    index, _ = nearest_synthetic_reference(points.detach(), centers)
    torch.testing.assert_close(points.grad, 2 * (points.detach() - centers[index]), rtol=1e-12, atol=1e-12)


def test_opcheck(generator):
    samples = [
        (_random((7, 5), generator), _random((3, 5), generator)),
        (_random((7, 5), generator).requires_grad_(), _random((3, 5), generator).requires_grad_()),
        (_random((6, 4), generator, torch.float32), _random((2, 4), generator, torch.float32).requires_grad_()),
    ]
    for points, centers in samples:
        torch.library.opcheck(torch.ops.fastdd.nearest_synthetic.default, (points, centers))
    points, centers = samples[0]
    _, index = torch.ops.fastdd.nearest_synthetic(points, centers)
    torch.library.opcheck(
        torch.ops.fastdd.nearest_synthetic_backward.default, (_random((7,), generator), points, centers, index)
    )


def test_auto_backend_choice(monkeypatch, generator):
    points = _random((4, 3), generator, torch.float32)
    assert nearest.resolve_backend("auto", points) == "cpp"
    assert nearest.resolve_backend("auto", points.half()) == "cpp"
    assert nearest.resolve_backend("auto", points.bfloat16()) == "cpp"
    assert nearest.resolve_backend("auto", points.to(torch.float8_e4m3fn)) == "reference"  # no kernels for float8
    monkeypatch.setattr(nearest._extension, "has_cpp", lambda: False)
    assert nearest.resolve_backend("auto", points) == "reference"
    with pytest.raises(RuntimeError, match=r"'cpp' is unavailable: the compiled extension fastdd\._C did not load"):
        nearest_synthetic(points, points, backend="cpp")


# bfloat16 / float16 points and centers: every backend sums the distances in float32 from the exact half values and
# rounds sq_dist (and the gradients, grad_centers summed in float32) once; against the float64 reference on the same
# values, index exactly, values with the tolerances of tests/half_precision.py (two units of roundoff, 1e-5 absolute).
@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(37, 5, 13, 0), (6, 19, 21, 0), (37, 11, 13, 3)])
def test_half_precision_matches_float64_reference(backend, dtype, shape, generator):
    n, m, d, groups = shape
    points, centers, point_groups, center_groups = _grouped_problem((n, m, d, max(groups, 1)), generator)
    if not groups:
        point_groups = center_groups = None
    points, centers = rounded(points, dtype), rounded(centers, dtype)
    weight = rounded(_random((n,), generator), dtype)
    expected_index, expected_dist = nearest_synthetic_reference(
        points.requires_grad_(), centers.requires_grad_(), point_groups, center_groups
    )
    expected_grads = torch.autograd.grad((expected_dist * weight).sum(), (points, centers))
    half = [t.detach().to(dtype).requires_grad_() for t in (points, centers)]
    index, sq_dist = nearest_synthetic(*half, point_groups=point_groups, center_groups=center_groups, backend=backend)
    assert torch.equal(index, expected_index)
    assert_close_to_reference(sq_dist, expected_dist, dtype)
    grads = torch.autograd.grad((sq_dist * weight.to(dtype)).sum(), half)
    for got, want in zip(grads, expected_grads, strict=True):
        assert_close_to_reference(got, want, dtype)


def test_float8_runs_on_reference_only(generator):
    points = _random((10, 4), generator).to(torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 and float16"):
        nearest_synthetic(points, points, backend="cpp")


def test_triton_needs_cuda_or_interpreter(monkeypatch, generator):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    points = _random((4, 3), generator)
    with pytest.raises(RuntimeError, match="'triton' is unavailable: Triton kernels need CUDA tensors"):
        nearest_synthetic(points, points, backend="triton")


@pytest.mark.parametrize(
    ("points", "centers", "error", "match"),
    [
        (torch.zeros(5), torch.zeros(2, 5), ValueError, r"points \[N, D\] and centers \[M, D\], got points \(5,\)"),
        (torch.zeros(4, 3), torch.zeros(2, 4), ValueError, r"same feature size D, got points \(4, 3\) and centers"),
        (torch.zeros(4, 3), torch.zeros(0, 3), ValueError, r"at least one center, got .* centers \(0, 3\)"),
        (torch.zeros(4, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), TypeError, "floating-point"),
        (torch.zeros(4, 3), torch.zeros(2, 3, dtype=torch.float64), TypeError, "one dtype, got torch.float32 and"),
        (torch.zeros(4, 3).numpy(), torch.zeros(2, 3), TypeError, "expects tensors, got points of type ndarray"),
    ],
)
def test_invalid_inputs_raise(points, centers, error, match):
    with pytest.raises(error, match=match):
        nearest_synthetic(points, centers)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown nearest_synthetic backend 'cuda'; valid backends are auto"):
        nearest_synthetic(torch.zeros(2, 2), torch.zeros(1, 2), backend="cuda")


def test_compiled_op_checks_its_arguments():
    with pytest.raises(RuntimeError, match="points must be 2-D"):
        torch.ops.fastdd.nearest_synthetic(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"index\[1\] = 7 is out of range for 2 centers"):
        torch.ops.fastdd.nearest_synthetic_backward(
            torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 7])
        )


# --- Groups: each point is compared only with the centers of its own group (e.g. its class) ---

# (N, M, D, groups): odd sizes, groups of 1..7 centers (every register-tile remainder), one group, many groups.
GROUP_SHAPES = [(37, 11, 13, 3), (9, 5, 6, 5), (23, 7, 4, 1), (50, 30, 17, 4), (0, 3, 4, 2)]


def _grouped_problem(shape, generator, dtype=torch.float64):
    """Random points and centers with unsorted group labels (arbitrary values: negative and large), every group of
    the points having at least one center."""
    n, m, d, num_groups = shape
    labels = torch.tensor([-7, 3, 10**12, 0, 5])[:num_groups] if num_groups <= 5 else torch.arange(num_groups)
    center_groups = labels[torch.cat([torch.arange(num_groups), torch.randint(0, num_groups, (m - num_groups,),
                                                                             generator=generator)])]
    center_groups = center_groups[torch.randperm(m, generator=generator)]
    point_groups = labels[torch.randint(0, num_groups, (n,), generator=generator)]
    return _random((n, d), generator, dtype), _random((m, d), generator, dtype), point_groups, center_groups


def _grouped_definition(points, centers, point_groups, center_groups):
    """The definition, point by point in float64: the first minimum over the centers of the point's group."""
    index, dist = [], []
    for i in range(points.shape[0]):
        allowed = [j for j in range(centers.shape[0]) if int(center_groups[j]) == int(point_groups[i])]
        sq = [float((points[i].double() - centers[j].double()).square().sum()) for j in allowed]
        best = min(range(len(allowed)), key=lambda a: (sq[a], a))
        index.append(allowed[best])
        dist.append(sq[best])
    return torch.tensor(index, dtype=torch.int64), torch.tensor(dist, dtype=torch.float64)


@pytest.mark.parametrize("shape", GROUP_SHAPES)
def test_grouped_reference_matches_definition(shape, generator):
    points, centers, point_groups, center_groups = _grouped_problem(shape, generator)
    index, sq_dist = nearest_synthetic_reference(points, centers, point_groups, center_groups)
    expected_index, expected_dist = _grouped_definition(points, centers, point_groups, center_groups)
    assert index.dtype == torch.int64 and index.shape == (shape[0],)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12)
    assert torch.equal(center_groups[index], point_groups)


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("shape", GROUP_SHAPES)
def test_grouped_backend_matches_reference_float64(backend, shape, generator):
    points, centers, point_groups, center_groups = _grouped_problem(shape, generator)
    index, sq_dist = nearest_synthetic(
        points, centers, point_groups=point_groups, center_groups=center_groups, backend=backend
    )
    expected_index, expected_dist = nearest_synthetic_reference(points, centers, point_groups, center_groups)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_one_group_equals_no_groups(backend, generator):
    points, centers = _random((19, 6), generator), _random((9, 6), generator)
    same = nearest_synthetic(points, centers, backend=backend)
    grouped = nearest_synthetic(
        points, centers, point_groups=torch.full((19,), 4), center_groups=torch.full((9,), 4), backend=backend
    )
    torch.testing.assert_close(grouped, same, rtol=0, atol=0)


def test_cpp_grouped_realistic_size_float32(generator):
    # The robust-loss workload in miniature: 10 classes in shuffled order, 10 centers per class, D large enough for
    # the vectorised tiles; checked against the float64 definition computed class by class.
    classes, per_class = 10, 21
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=generator)]
    center_groups = torch.arange(classes).repeat(10)
    points, centers = _random((len(labels), 1031), generator, torch.float32), _random((100, 1031), generator, torch.float32)
    index, sq_dist = nearest_synthetic(points, centers, point_groups=labels, center_groups=center_groups, backend="cpp")
    expected_index, expected_dist = nearest_synthetic_reference(points.double(), centers.double(), labels, center_groups)
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist.float(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_grouped_equals_each_group_alone_bitwise(dtype, generator):
    # A pair's distance must not depend on which rows share its tiles or which rows are fetched ahead (grouped calls
    # with one center block per class prefetch two row tiles ahead): odd class sizes, D with a tail after the vectors.
    classes, dim = 5, 1029
    sizes = [1, 6, 13, 22, 3]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    center_groups = torch.arange(classes).repeat(7)
    points = _random((len(labels), dim), generator, dtype)
    centers = _random((len(center_groups), dim), generator, dtype)
    index, sq_dist = nearest_synthetic(points, centers, point_groups=labels, center_groups=center_groups, backend="cpp")
    for k in range(classes):
        rows, own = (labels == k).nonzero().flatten(), (center_groups == k).nonzero().flatten()
        alone_index, alone_dist = nearest_synthetic(points[rows], centers[own], backend="cpp")
        assert torch.equal(index[rows], own[alone_index])
        assert torch.equal(sq_dist[rows], alone_dist)


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_grouped_ties_resolve_to_lowest_index_of_the_group(backend):
    # Small integers: every distance is exact. Center 0 (group 1) is as close to the group-2 points as centers 2 and
    # 4 but not allowed for them; inside group 2, centers 2 and 4 tie and the lower one wins.
    centers = torch.tensor([[1.0, 0.0], [9.0, 9.0], [0.0, 1.0], [5.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    center_groups = torch.tensor([1, 1, 2, 1, 2])
    points = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    point_groups = torch.tensor([2, 1, 1, 2])
    index, sq_dist = nearest_synthetic(
        points, centers, point_groups=point_groups, center_groups=center_groups, backend=backend
    )
    # Hand-computed: (0,0) in group 2 is at 1 from centers 2 and 4 -> 2; (5,0) in group 1 is on center 3; (0,0) in
    # group 1 is at 1 from center 0; (1,1) in group 2 is at 1 from center 2 and 5 from center 4.
    assert index.tolist() == [2, 3, 0, 2]
    assert sq_dist.tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_grouped_nan_and_inf_distances(backend, generator):
    points, centers = _random((6, 5), generator), _random((6, 5), generator)
    point_groups, center_groups = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([1, 0, 0, 1, 1, 0])
    points[2, 1] = float("nan")  # every distance of point 2 is NaN -> the first center of group 0 (center 1)
    centers[5, 0] = float("nan")  # NaN for every group-0 point -> center 5 wins unless a lower center is NaN too
    points[3] = 1e300  # all of point 3's distances overflow to +inf -> the first center of group 1 (center 0)
    index, sq_dist = nearest_synthetic(
        points, centers, point_groups=point_groups, center_groups=center_groups, backend=backend
    )
    expected_index, expected_dist = nearest_synthetic_reference(points, centers, point_groups, center_groups)
    assert expected_index[2] == 1 and expected_index[3] == 0 and expected_index[0] == 5
    torch.testing.assert_close(index, expected_index, rtol=0, atol=0)
    torch.testing.assert_close(sq_dist, expected_dist, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", *COMPILED_BACKENDS])
def test_group_without_centers_raises(backend, generator):
    points, centers = _random((5, 3), generator), _random((4, 3), generator)
    point_groups, center_groups = torch.tensor([0, 2, 0, 7, 7]), torch.tensor([2, 0, 0, 2])
    with pytest.raises(ValueError, match="point 3 is in group 7, which has no center"):
        nearest_synthetic(points, centers, point_groups=point_groups, center_groups=center_groups, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_grouped_gradcheck(backend, generator):
    points = _random((11, 4), generator).requires_grad_()
    centers = _random((5, 4), generator).requires_grad_()
    point_groups, center_groups = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0]), torch.tensor([1, 0, 0, 1, 1])

    def sq_dist(p, c):
        return nearest_synthetic(p, c, point_groups=point_groups, center_groups=center_groups, backend=backend)[1]

    assert torch.autograd.gradcheck(sq_dist, (points, centers))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_grouped_gradients_match_reference(backend, generator):
    points, centers, point_groups, center_groups = _grouped_problem((37, 11, 13, 3), generator)
    points.requires_grad_()
    centers.requires_grad_()
    weight = _random((37,), generator)
    _, sq_dist = nearest_synthetic(
        points, centers, point_groups=point_groups, center_groups=center_groups, backend=backend
    )
    grads = torch.autograd.grad((sq_dist * weight).sum(), (points, centers))
    _, expected_dist = nearest_synthetic_reference(points, centers, point_groups, center_groups)
    expected = torch.autograd.grad((expected_dist * weight).sum(), (points, centers))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_graph_without_grad(generator):
    points, centers = _random((8, 3), generator).requires_grad_(), _random((3, 3), generator)
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        _, sq_dist = nearest_synthetic(points, centers, point_groups=groups[0], center_groups=groups[1], backend="cpp")
    assert sq_dist.grad_fn is None and not sq_dist.requires_grad


def test_grouped_opcheck(generator):
    points, centers, point_groups, center_groups = _grouped_problem((9, 5, 4, 2), generator)
    for p, c in ((points, centers), (points.clone().requires_grad_(), centers.clone().requires_grad_())):
        torch.library.opcheck(torch.ops.fastdd.nearest_synthetic.default, (p, c, point_groups, center_groups))


@pytest.mark.parametrize(
    ("point_groups", "center_groups", "error", "match"),
    [
        (torch.zeros(4, dtype=torch.long), None, ValueError, "both point_groups and center_groups, or neither"),
        (torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.long), ValueError, r"point_groups \[N\]"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), ValueError, r"center_groups \[M\]"),
        (torch.zeros(4, dtype=torch.int32), torch.zeros(2, dtype=torch.long), TypeError, "int64 group labels"),
        ([0, 0, 0, 0], torch.zeros(2, dtype=torch.long), TypeError, "group tensors, got point_groups of type list"),
    ],
)
def test_invalid_groups_raise(point_groups, center_groups, error, match):
    with pytest.raises(error, match=match):
        nearest_synthetic(torch.zeros(4, 3), torch.zeros(2, 3), point_groups=point_groups, center_groups=center_groups)


def test_compiled_op_checks_its_groups():
    with pytest.raises(RuntimeError, match="pass both point_groups and center_groups, or neither"):
        torch.ops.fastdd.nearest_synthetic(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="point_groups must have shape"):
        torch.ops.fastdd.nearest_synthetic(
            torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        )


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpp_narrower_simd_copies(capability):
    # The CPU kernel has one copy per x86-64 level (AVX-512, AVX2, SSE2) and picks the widest at load time;
    # ATEN_CPU_CAPABILITY caps it, so the narrower copies run here too (in a fresh process: the choice is made once).
    script = (
        "import torch\n"
        "from fastdd.ops.nearest import nearest_synthetic, nearest_synthetic_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype in (torch.float64, torch.float32):\n"
        "    points, centers = torch.randn(43, 37, generator=g, dtype=dtype), torch.randn(13, 37, generator=g, dtype=dtype)\n"
        "    groups = torch.randint(0, 3, (43,), generator=g), torch.arange(13) % 3\n"
        "    for kw in ({}, {'point_groups': groups[0], 'center_groups': groups[1]}):\n"
        "        index, sq_dist = nearest_synthetic(points, centers, backend='cpp', **kw)\n"
        "        want_index, want_dist = nearest_synthetic_reference(points.double(), centers.double(), *kw.values())\n"
        "        assert torch.equal(index, want_index), (dtype, kw.keys())\n"
        "        torch.testing.assert_close(sq_dist.double(), want_dist, rtol=1e-5, atol=1e-5)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
