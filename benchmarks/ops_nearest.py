"""Benchmark of fastdd.ops.nearest_synthetic: every available backend against the pure-PyTorch reference.

    python benchmarks/ops_nearest.py [--n 2560 --m 100 --d 2048 --groups 0 --dtype float32 --repeats 5 --device cpu]

The default size is a group-robust clustering step: 2560 real embeddings (256 per class x 10 classes) assigned to
100 synthetic samples in a 2048-wide embedding. For forward and forward+backward it prints the median wall time and
the peak tensor memory of each backend, and both as ratios to the reference (time: reference / backend, so > 1 is
faster; memory: backend / reference, so < 1 is smaller). ``torch.cdist`` + argmin is shown for context: it is the
usual fast way, but it uses the ||p||^2 + ||c||^2 - 2 p.c expansion and is not exact. On CPU the profiler behind the
memory column logs start/stop lines to stderr; ``2>/dev/null`` hides them. ``--groups G`` labels the points and the
centers with G equal, contiguous groups (classes) and compares each point only with its own group's centers (the
robust-loss assignment; ``--groups 10 --d 3072`` is CIFAR-10 at IPC 10 in pixel space).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from common import describe_machine, median_seconds, peak_memory_bytes

from fastdd.ops import nearest


def _cdist_nearest(points: torch.Tensor, centers: torch.Tensor, point_groups=None, center_groups=None):
    sq_dists = torch.cdist(points, centers).square()
    if point_groups is not None:
        sq_dists = sq_dists.masked_fill(point_groups[:, None] != center_groups[None, :], float("inf"))
    sq_dist, index = sq_dists.min(dim=1)
    return index, sq_dist


def _candidates(device: torch.device, probe: torch.Tensor, groups: dict) -> dict[str, Callable]:
    candidates = {"reference": lambda p, c: nearest.nearest_synthetic_reference(p, c, **groups)}
    for backend in ("cpp", "triton"):
        if nearest._unavailable_reason(backend, probe) is None and (backend != "triton" or device.type == "cuda"):
            candidates[backend] = lambda p, c, backend=backend: nearest.nearest_synthetic(p, c, backend=backend,
                                                                                         **groups)
    candidates["torch.cdist (inexact)"] = lambda p, c: _cdist_nearest(p, c, *groups.values())
    return candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2560, help="points (real samples)")
    parser.add_argument("--m", type=int, default=100, help="centers (synthetic samples)")
    parser.add_argument("--d", type=int, default=2048, help="features")
    parser.add_argument("--groups", type=int, default=0, help="compare points only with centers of their group (0: off)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(args.n, args.d, generator=generator, dtype=dtype).to(device)
    centers = torch.randn(args.m, args.d, generator=generator, dtype=dtype).to(device)
    grad_points = points.clone().requires_grad_()
    grad_centers = centers.clone().requires_grad_()
    groups = {}
    if args.groups:
        groups = {
            "point_groups": (torch.arange(args.n) * args.groups // max(1, args.n)).to(device),
            "center_groups": (torch.arange(args.m) * args.groups // args.m).to(device),
        }

    grouping = f", {args.groups} groups" if args.groups else ""
    print(f"nearest_synthetic: N={args.n} points, M={args.m} centers, D={args.d}{grouping}, {args.dtype}, {device}")
    print(describe_machine(device))
    memory_source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "torch.profiler allocation events"
    print(f"median of {args.repeats} runs after 1 warm-up; peak = tensor memory above the inputs ({memory_source})")

    reference_index, _ = nearest.nearest_synthetic_reference(points, centers, **groups)
    rows = []
    for name, op in _candidates(device, points, groups).items():
        index, _ = op(points, centers)
        agreement = (index == reference_index).float().mean().item()

        def forward(op=op):
            with torch.no_grad():
                op(points, centers)

        def forward_backward(op=op):
            _, sq_dist = op(grad_points, grad_centers)
            sq_dist.sum().backward()
            grad_points.grad = grad_centers.grad = None

        for mode, fn in (("forward", forward), ("forward+backward", forward_backward)):
            seconds = median_seconds(fn, device, repeats=args.repeats)
            peak = peak_memory_bytes(fn, device)
            rows.append((name, mode, seconds, peak, agreement))

    reference = {mode: (seconds, peak) for name, mode, seconds, peak, _ in rows if name == "reference"}
    header = (
        f"{'backend':<24}{'mode':<18}{'median ms':>11}{'speedup':>9}{'peak MiB':>10}{'mem ratio':>11}{'same index':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, mode, seconds, peak, agreement in rows:
        ref_seconds, ref_peak = reference[mode]
        memory_ratio = f"{peak / ref_peak:.3f}" if ref_peak else "n/a"
        print(
            f"{name:<24}{mode:<18}{seconds * 1e3:>11.1f}{ref_seconds / seconds:>8.1f}x"
            f"{peak / 2**20:>10.2f}{memory_ratio:>11}{agreement:>11.1%}"
        )


if __name__ == "__main__":
    main()
