"""Write a digits set the way the MTT code stores one (``images_best.pt``, ``labels_best.pt``, ``lr_best.pt``), to try
`fastdd import` on a set that fastdd did not make.

The images are IPC random training images per class, normalised with the dataset's mean and std as the MTT code
normalises its inputs, in class-major order; the labels are class indices; the lr is a stand-in for a learned one.
Only torch and scikit-learn are used, as another tool would.

    python examples/write_mtt_set.py runs/foreign-mtt --ipc 10
    fastdd import --format mtt runs/foreign-mtt --dataset digits --out runs/foreign-imported
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(args.seed)
    chosen = torch.cat([
        torch.nonzero(labels == c).flatten()[torch.randperm(int((labels == c).sum()), generator=generator)[:args.ipc]]
        for c in range(10)
    ])
    mean, std = 0.3059, 0.3765  # fastdd's (and a DC-style loader's) digits statistics
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save((pixels[chosen] - mean) / std, args.out / "images_best.pt")
    torch.save(labels[chosen], args.out / "labels_best.pt")
    torch.save(torch.tensor(args.lr), args.out / "lr_best.pt")
    print(f"{len(chosen)} images written to {args.out} (images_best.pt, labels_best.pt, lr_best.pt)")


if __name__ == "__main__":
    main()
