"""Masked distillation training (paper 004): is a set distilled with MDT more calibratable, with a flatter SVD curve?

The paper's appendix claims that networks trained on an MDT set calibrate better (ECE after TS / MTS / label
smoothing / mixup / focal loss) and that MDT spreads the information of a set over more components (a flatter SVD
curve) than plain distillation, which concentrates it. Here:

1. ``tesla`` sets at IPC 10 distilled with ``--mdt --mask-ratio r`` for each r (r = 0: no MDT), all from the same
   experts and seed, plus random real subsets of the same IPC (``--iterations 0``, several seeds) as the SVD
   baseline. First check: is the plain set's SVD curve more concentrated than the real images' (the premise)?
2. Each set evaluated with ``--runs`` networks: raw / TS / MTS (r = 0.3) ECE of cross-entropy networks, and the raw
   ECE of networks trained with label smoothing, mixup and focal loss; and the SVD curve (``fastdd inspect
   --no-train``: share of the singular-value sum in the top 10 % of components, components for 90 %).

The unit is an evaluation network (run; the evaluation seed is the same for every set, so run i of each set starts
from the same weights): mean ± std over runs and paired differences of each r against r = 0 with 95 % intervals. One
distillation per r: a difference says how this set differs, not how every MDT set would.

Run (distillations resume, evaluations are skipped when done)::

    python examples/reproduce_mdt.py --dataset digits --iterations 500 --experts runs/experts-digits --runs 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from repro_common import (
    arms_table, differences_table, distill, evaluate, fastdd, mean_std, parallel, say, this_command, write_results,
)

LOSSES = ["ls", "mixup", "focal"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.1, 0.3, 0.5])
    parser.add_argument("--experts", type=Path, required=True, help="experts folder (fastdd experts --out DIR)")
    parser.add_argument("--real-seeds", type=int, default=5, help="random real subsets for the SVD baseline")
    parser.add_argument("--runs", type=int, default=5, help="evaluation networks per set and training loss")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--ece-bins", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `fastdd distill` options")
    args = parser.parse_args()

    def set_dir(r: float) -> Path:
        return args.runs_dir / f"mdt-{args.dataset}-r{r:g}"

    common = ["--method", "tesla", "--dataset", args.dataset, "--ipc", str(args.ipc), "--iterations",
              str(args.iterations), "--experts", str(args.experts)]
    log = args.runs_dir / f"mdt-{args.dataset}.log"

    def distill_set(r: float):
        return lambda: distill(set_dir(r), [*common, *(["--mdt", "--mask-ratio", f"{r:g}"] if r else []),
                                            *args.extra], log)

    real_dirs = [args.runs_dir / f"real-{args.dataset}-ipc{args.ipc}-s{s}" for s in range(args.real_seeds)]

    def real_set(seed: int):
        return lambda: distill(real_dirs[seed], ["--method", "dsa", "--dataset", args.dataset, "--ipc",
                                                 str(args.ipc), "--iterations", "0", "--seed", str(seed)], log)

    parallel([distill_set(r) for r in args.ratios], args.jobs)
    parallel([real_set(s) for s in range(args.real_seeds)], args.jobs)

    protocol = ["--runs", str(args.runs), "--epochs", str(args.epochs), "--ece-bins", str(args.ece_bins)]
    evaluations = {"ce": ["--calibration", "none,ts,mts"],
                   **{loss: ["--train-loss", loss, "--calibration", "none"] for loss in LOSSES}}

    def evaluate_set(r: float, name: str):
        def job() -> None:
            folder = set_dir(r)
            evaluate(folder, [*protocol, *evaluations[name]], folder / f"mdt-eval-{name}.json", log)
            say(f"done: r {r:g} {name}")
        return job

    parallel([evaluate_set(r, n) for r in args.ratios for n in evaluations], args.jobs)
    svd_json = args.runs_dir / f"mdt-{args.dataset}-svd.json"
    fastdd(["inspect", *map(set_dir, args.ratios), *real_dirs, "--no-train", "--json", svd_json, "--quiet"], log)
    svd = json.loads(svd_json.read_text())["sets"]

    def share(entry: dict) -> float:
        return next(p["ratio"] for p in entry["svd"]["ratio_at"] if p["fraction"] == 0.1)

    arms: dict[str, dict[str, list[float]]] = {}
    for r in args.ratios:
        values: dict[str, list[float]] = {}
        ce = json.loads((set_dir(r) / "mdt-eval-ce.json").read_text())["models"]["convnet"]["calibration"]
        values["acc"] = ce["none"]["acc"]["runs"]
        for method, key in (("none", "ece raw"), ("ts", "ece TS"), ("mts", "ece MTS")):
            values[key] = ce[method]["ece"]["runs"]
        for loss in LOSSES:
            rows = json.loads((set_dir(r) / f"mdt-eval-{loss}.json").read_text())["models"]["convnet"]
            values[f"ece {loss}"] = rows["calibration"]["none"]["ece"]["runs"]
        arms[f"r {r:g}"] = values
    metrics = ["acc", "ece raw", "ece TS", "ece MTS", *[f"ece {loss}" for loss in LOSSES]]
    lower = {m: -1 for m in metrics if m.startswith("ece")} | {"acc": 1}
    pairs = [(f"r {r:g}", f"r {args.ratios[0]:g}") for r in args.ratios[1:]]

    svd_rows = ["| set | top-10 % share of the singular-value sum | components for 90 % |", "|---|---|---|"]
    for r, entry in zip(args.ratios, svd[: len(args.ratios)]):
        svd_rows.append(f"| tesla r {r:g} | {share(entry):.3f} | {entry['svd']['components_for']['90']} |")
    real = [share(e) for e in svd[len(args.ratios):]]
    real_components = [e["svd"]["components_for"]["90"] for e in svd[len(args.ratios):]]
    mean, std = mean_std(real)
    svd_rows.append(f"| random real images ({len(real)} subsets) | {mean:.3f} ± {std:.3f} (min {min(real):.3f}, max "
                    f"{max(real):.3f}) | {min(real_components)}-{max(real_components)} |")
    plain = share(svd[0])
    premise = ("holds: the plain set is more concentrated than every real subset" if plain > max(real) else
               "does not hold: the plain set is not more concentrated than the real subsets")

    text = "\n\n".join([
        f"MDT on {args.dataset}: tesla IPC {args.ipc}, {args.iterations} iterations (experts {args.experts}), "
        f"--mdt --mask-ratio r; {args.runs} networks x {args.epochs} epochs per set and training loss; ECE in % "
        f"({args.ece_bins} bins) on the test set, mean ± std over networks; MTS at r = 0.3.",
        "SVD curves (`fastdd inspect --no-train`; a larger top-10 % share = more concentrated). The premise (a "
        f"well-distilled set is more concentrated than real images) {premise}.",
        "\n".join(svd_rows),
        arms_table(arms, metrics),
        "Paired differences against the plain set (per network), mean [95 % interval] and verdict:",
        differences_table(arms, pairs, metrics, better=lower),
        f"Command: `{this_command()}`; distillation: `fastdd distill {' '.join(common)} [--mdt --mask-ratio r]`; "
        f"evaluation: `fastdd evaluate SET {' '.join(protocol)}` with "
        + "; ".join(f"`{' '.join(v)}`" for v in evaluations.values()) + ".",
    ])
    write_results(args.results, text)


if __name__ == "__main__":
    main()
