"""ECE of networks trained on a synthetic set after masked temperature scaling, for several masking ratios.

The networks are trained once (the `fastdd evaluate` protocol, cross-entropy) and every ratio refits only the
temperature, so the sweep costs about one evaluation. Used to choose `fastdd.trust.masking.DEFAULT_MASK_RATIO`:

    python examples/mts_mask_ratio_sweep.py runs/digits-tesla10 --runs 3 --epochs 300
"""

from __future__ import annotations

import argparse
import zlib

import torch

from fastdd.evaluate import EvalConfig, dataset_for_synset, train_on_synthetic
from fastdd.evaluate.calibration import calibration_metrics
from fastdd.io import SyntheticSet
from fastdd.models import build_model_for
from fastdd.training import predict_logits
from fastdd.trust.temperature import hard_labels, masked_temperature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synset", help="folder written by `fastdd distill`")
    parser.add_argument("--ratios", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7", help="comma-separated masking ratios")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="masks drawn per synthetic image (MTS_REPEATS)")
    args = parser.parse_args()

    ratios = [float(r) for r in args.ratios.split(",")]
    synset = SyntheticSet.load(args.synset)
    dataset = dataset_for_synset(synset)
    config = EvalConfig(runs=args.runs, epochs=args.epochs, seed=args.seed)
    lr = float(synset.syn_lr) if synset.syn_lr is not None else 0.01
    strategy = synset.meta.get("dsa_strategy") or dataset.dsa_strategy
    targets = synset.soft_labels if synset.soft_labels is not None else synset.labels
    labels = hard_labels(targets)
    hyper = synset.meta.get("hyperparameters", {})
    generator = torch.Generator().manual_seed(args.seed)
    rows: dict[float, list[tuple[float, float, float]]] = {r: [] for r in ratios}
    raw = []
    for run in range(args.runs):
        net = build_model_for(
            dataset, "convnet", width=hyper.get("width", 128), depth=hyper.get("depth"),
            norm=hyper.get("norm", "instancenorm"), generator=generator,
        )
        train_on_synthetic(synset.images, targets, net, config=config, lr=lr, generator=generator,
                           dsa_strategy=strategy)
        test_logits = predict_logits(net, dataset.test_images)
        raw.append(calibration_metrics(test_logits, dataset.test_labels))
        for ratio in ratios:
            masks = torch.Generator().manual_seed(zlib.crc32(f"{args.seed}/{run}/{ratio}".encode()))
            temperature = masked_temperature(
                net, synset.images, labels, ratio=ratio, generator=masks, repeats=args.repeats
            )
            metrics = calibration_metrics(test_logits, dataset.test_labels, temperature=temperature)
            rows[ratio].append((temperature, metrics["ece"], metrics["nll"]))
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"{args.synset}: {dataset.name}, {args.runs} runs x {args.epochs} epochs, "
          f"test acc {mean([m['acc'] for m in raw]):.2f} %, {args.repeats} masks per image")
    std = lambda values: (sum((v - mean(values)) ** 2 for v in values) / len(values)) ** 0.5  # noqa: E731
    print(f"{'ratio':>6} {'T':>8} {'T std':>8} {'ECE %':>8} {'NLL':>8}")
    print(f"{'raw':>6} {1.0:8.3f} {0.0:8.3f} {mean([m['ece'] for m in raw]):8.2f} {mean([m['nll'] for m in raw]):8.3f}")
    for ratio, values in rows.items():
        t, e, n = (mean([v[i] for v in values]) for i in range(3))
        print(f"{ratio:6.2f} {t:8.3f} {std([v[0] for v in values]):8.3f} {e:8.2f} {n:8.3f}")


if __name__ == "__main__":
    main()
