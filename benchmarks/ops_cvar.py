"""Benchmark of fastdd.ops.cluster_cvar and of the whole group-robust loss against the way reference code does it.

    python benchmarks/ops_cvar.py [--n 2560 --m 100 --d 3072 --alpha 0.8 --repeats 5 --device cpu]

Two tables, median wall time of ``--repeats`` runs after a warm-up, forward and forward+backward, as speedups over
the reference (reference / backend, so > 1 is faster):

1. ``cluster_cvar`` alone on N losses in M clusters: each backend against ``cluster_cvar_reference`` (a Python loop
   over clusters with a stable sort).
2. The group-robust loss of one network update, from real samples [N, D], synthetic samples [M, D] and per-sample
   losses [N]: ``nearest_synthetic`` + ``group_cvar_loss`` (fastdd, auto backends) against the group-DRO reference
   code's way: ``torch.cdist``, an argmin, then a Python loop over clusters that sorts each cluster's losses.
   The default size is CIFAR-10 at IPC 10: 2560 real images (256 per class), 100 synthetic, 3x32x32 pixels.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from common import describe_machine, median_seconds

from fastdd.ops import cvar, group_cvar_loss, nearest_synthetic


def _reference_code_loss(real: torch.Tensor, synthetic: torch.Tensor, losses: torch.Tensor, alpha: float):
    """cdist + argmin + a per-cluster sort, as the group-DRO reference code computes it (upper tail here)."""
    assign = torch.cdist(real, synthetic).argmin(dim=1)
    values = []
    for g in range(synthetic.shape[0]):
        members = losses[assign == g]
        if members.numel() == 0:
            continue
        k = max(1, math.ceil(alpha * members.numel()))
        values.append(torch.sort(members, descending=True).values[:k].mean())
    stacked = torch.stack(values)
    return stacked.mean() + stacked.max()


def _fastdd_loss(real: torch.Tensor, synthetic: torch.Tensor, losses: torch.Tensor, alpha: float):
    assign, _ = nearest_synthetic(real, synthetic)
    return group_cvar_loss(losses, assign, synthetic.shape[0], alpha)


def _print_table(title: str, candidates: dict[str, Callable[[], torch.Tensor]], leaf: torch.Tensor,
                 device: torch.device, repeats: int) -> None:
    """Forward and forward+backward median times of each candidate (a call returning a scalar or [G] tensor that
    depends on ``leaf``), and speedups over the first candidate."""
    header = f"{title:<44}{'forward ms':>12}{'speedup':>9}{'fwd+bwd ms':>12}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    base = None
    for name, call in candidates.items():
        def forward(call=call):
            with torch.no_grad():
                call()

        def forward_backward(call=call):
            call().sum().backward()
            leaf.grad = None

        times = (median_seconds(forward, device, repeats=repeats), median_seconds(forward_backward, device, repeats=repeats))
        base = base or times
        print(f"{name:<44}{times[0] * 1e3:>12.2f}{base[0] / times[0]:>8.1f}x{times[1] * 1e3:>12.2f}"
              f"{base[1] / times[1]:>8.1f}x")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2560, help="real samples (losses)")
    parser.add_argument("--m", type=int, default=100, help="synthetic samples (clusters)")
    parser.add_argument("--d", type=int, default=3072, help="features of the real and synthetic samples")
    parser.add_argument("--alpha", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(args.n, args.d, generator=generator).to(device)
    synthetic = torch.randn(args.m, args.d, generator=generator).to(device)
    losses = torch.rand(args.n, generator=generator).mul(3).to(device).requires_grad_(True)
    assign = torch.randint(0, args.m, (args.n,), generator=generator).to(device)

    print(f"cluster_cvar: N={args.n} losses, M={args.m} clusters, alpha {args.alpha}; loss pipeline D={args.d}; {device}")
    print(describe_machine(device))
    print(f"median of {args.repeats} runs after 1 warm-up; speedup = reference time / time")
    print()

    backends = ["reference"] + [b for b in ("cpp", "triton") if cvar._unavailable_reason(b, losses) is None]
    if device.type != "cuda" and "triton" in backends:
        backends.remove("triton")  # the interpreter is a correctness tool, not a speed one
    _print_table(
        "cluster_cvar backend",
        {b: lambda b=b: cvar.cluster_cvar(losses, assign, args.m, args.alpha, backend=b) for b in backends},
        losses, device, args.repeats,
    )
    _print_table(
        "group-robust loss",
        {
            "reference code (cdist + loop with sort)": lambda: _reference_code_loss(real, synthetic, losses, args.alpha),
            "fastdd (nearest_synthetic + group_cvar)": lambda: _fastdd_loss(real, synthetic, losses, args.alpha),
        },
        losses, device, args.repeats,
    )
    with torch.no_grad():
        same = torch.allclose(
            _reference_code_loss(real, synthetic, losses, args.alpha), _fastdd_loss(real, synthetic, losses, args.alpha)
        )
    print(f"same loss value: {same} (cdist's expansion can differ from the exact distance on near ties)")


if __name__ == "__main__":
    main()
