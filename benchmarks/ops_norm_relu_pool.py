"""Benchmark of fastdd.ops.instance_norm_relu_pool (the fused ConvNet block epilogue) against the unfused chain.

    python benchmarks/ops_norm_relu_pool.py [--batch 100 --width 128 --repeats 5]

For the feature maps of a ConvNet-3 student on 100 CIFAR-sized images (128 channels of 32x32, then 16x16, then
8x8), the median wall time of the forward, the forward+backward, and the "double" pass trajectory matching runs in
every step (a backward with its graph kept, then a backward through that: the derivatives of a function of the
block's gradients w.r.t. its input, weight and incoming gradient), for the reference (``F.group_norm`` +
``F.relu`` + ``F.avg_pool2d``) and the ``cpp`` backend; speedup = reference time / cpp time.
"""

from __future__ import annotations

import argparse

import torch
from common import describe_machine, median_seconds

from fastdd.ops.norm_relu_pool import instance_norm_relu_pool


def _passes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str):
    """forward, forward+backward and double-backward calls of the block on these inputs."""

    def forward():
        with torch.no_grad():
            instance_norm_relu_pool(x, weight, bias, backend=backend)

    def forward_backward():
        y = instance_norm_relu_pool(x, weight, bias, backend=backend)
        torch.autograd.grad(y, (x, weight, bias), torch.ones_like(y))

    def double():
        y = instance_norm_relu_pool(x, weight, bias, backend=backend)
        grad_y = torch.ones_like(y).requires_grad_(True)
        grad_x, grad_weight, grad_bias = torch.autograd.grad(y, (x, weight, bias), grad_y, create_graph=True)
        directional = (grad_x * x.detach()).sum() + grad_weight.sum() + grad_bias.sum()
        torch.autograd.grad(directional, (x, weight, grad_y))

    return {"forward": forward, "fwd+bwd": forward_backward, "double": double}


def norm_relu_pool_rows(repeats: int, device: torch.device, *, batch: int = 100, width: int = 128) -> list[dict]:
    """One row per (feature-map size, pass): times of the reference and cpp backends in ms and the speedup."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in (32, 16, 8):
        x = torch.randn(batch, width, size, size, generator=generator).to(device).requires_grad_(True)
        weight = (1 + 0.1 * torch.randn(width, generator=generator)).to(device).requires_grad_(True)
        bias = (0.1 * torch.randn(width, generator=generator)).to(device).requires_grad_(True)
        reference, fused = _passes(x, weight, bias, "reference"), _passes(x, weight, bias, "cpp")
        for name in reference:
            ref_s = median_seconds(reference[name], device, repeats=repeats)
            cpp_s = median_seconds(fused[name], device, repeats=repeats)
            rows.append({
                "op": "instance_norm_relu_pool",
                "case": f"{batch}x{width}x{size}x{size} {name}",
                "reference_ms": ref_s * 1e3,
                "fastdd_ms": cpp_s * 1e3,
                "speedup": ref_s / cpp_s,
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device("cpu")
    print(describe_machine(device))
    print(f"median of {args.repeats} runs after 1 warm-up; speedup = reference time / cpp time\n")
    header = f"{'feature maps and pass':<28}{'reference ms':>14}{'cpp ms':>10}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    for row in norm_relu_pool_rows(args.repeats, device, batch=args.batch, width=args.width):
        print(f"{row['case']:<28}{row['reference_ms']:>14.2f}{row['fastdd_ms']:>10.2f}{row['speedup']:>8.1f}x")


if __name__ == "__main__":
    main()
