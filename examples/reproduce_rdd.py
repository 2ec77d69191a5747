"""Group-robust dataset distillation (paper 002): does the robust objective raise worst-cluster accuracy?

Arms, each distilled once per seed and evaluated with ``--robustness`` (the evaluation's own seeds are the same for
every arm, so arms are paired by distillation seed):

- ``dsa``: baseline DSA (its outer/inner loops by IPC, the network trained on the synthetic set);
- ``official-ce``: the authors' schedule (``--robust-schedule official``: a fresh network per iteration, outer 2 /
  inner 2, the network trained on DSA-augmented real batches) with plain cross-entropy, which is what the authors'
  released code computes (its CVaR term is detached);
- ``official-upper``: the same schedule with ``--robust --cvar-tail upper`` (fastdd's differentiable upper tail);
- ``official-lower``: the same with ``--robust --cvar-tail lower`` (the authors' trimmed mean, made differentiable).

Both robust arms assign a real image to its nearest synthetic image among all classes (``--robust-assign all``, the
authors' assignment), so they differ from each other only in the tail, and from ``official-ce`` only in the
objective. The unit is a distillation seed: mean ± std over seeds and paired differences with 95 % intervals.

Run (every step resumes or is skipped when its output exists, so the script can be stopped and started again)::

    python examples/reproduce_rdd.py --dataset digits --ipc 1 --iterations 500 --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from repro_common import (
    arms_table, differences_table, distill, evaluate, parallel, say, this_command, write_results,
)

ARMS = {
    "dsa": [],
    "official-ce": ["--robust-schedule", "official"],
    "official-upper": ["--robust-schedule", "official", "--robust", "--cvar-tail", "upper", "--robust-assign", "all"],
    "official-lower": ["--robust-schedule", "official", "--robust", "--cvar-tail", "lower", "--robust-assign", "all"],
}
METRICS = ["acc", "cluster_min", "cluster_mean", "noise", "blur", "invert"]
PAIRS = [("official-ce", "dsa"), ("official-upper", "official-ce"), ("official-lower", "official-ce"),
         ("official-lower", "official-upper"), ("official-lower", "dsa")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ipc", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--eval-runs", type=int, default=3, help="evaluation networks per distilled set")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    parser.add_argument("--jobs", type=int, default=1, help="pipelines run side by side, one torch thread each")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/repro"))
    parser.add_argument("--results", type=Path, default=None, help="also write the tables to this file")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more `fastdd distill` options for every arm (after everything else)")
    args = parser.parse_args()

    name = f"rdd-{args.dataset}-ipc{args.ipc}-it{args.iterations}"
    root = args.runs_dir / name
    common = ["--method", "dsa", "--dataset", args.dataset, "--ipc", str(args.ipc), "--iterations",
              str(args.iterations)]
    evaluation = ["--runs", str(args.eval_runs), "--epochs", str(args.epochs), "--robustness"]

    def pipeline(arm: str, seed: int):
        def job() -> None:
            out = root / f"{arm}-s{seed}"
            log = root / f"{arm}-s{seed}.log"
            distill(out, [*common, *ARMS[arm], "--seed", str(seed), *args.extra], log)
            evaluate(out, evaluation, out / "eval.json", log)
            say(f"done: {arm} seed {seed}")
        return job

    parallel([pipeline(a, s) for s in args.seeds for a in args.arms], args.jobs)

    arms: dict[str, dict[str, list[float]]] = {}
    for arm in args.arms:
        values: dict[str, list[float]] = {m: [] for m in METRICS}
        for seed in args.seeds:
            model = json.loads((root / f"{arm}-s{seed}" / "eval.json").read_text())["models"]["convnet"]
            values["acc"].append(model["acc"]["mean"])
            for m in METRICS[1:]:
                values[m].append(model["robustness"][m]["mean"])
        arms[arm] = values

    pairs = [p for p in PAIRS if p[0] in arms and p[1] in arms]
    text = "\n\n".join([
        f"Group-robust DD on {args.dataset}, DSA IPC {args.ipc}, {args.iterations} iterations; each set evaluated "
        f"with {args.eval_runs} networks x {args.epochs} epochs; unit = distillation seed ({len(args.seeds)} seeds: "
        f"{' '.join(map(str, args.seeds))}); accuracy in % (mean over the set's networks), mean ± std over seeds.",
        arms_table(arms, METRICS),
        "Paired differences (per seed), mean [95 % interval] and verdict:",
        differences_table(arms, pairs, METRICS, better={m: 1 for m in METRICS}),
        f"Command: `{this_command()}`; distillation: `fastdd distill {' '.join(common)} <arm options> --seed S`; "
        f"evaluation: `fastdd evaluate RUN {' '.join(evaluation)}`.",
    ])
    write_results(args.results, text)


if __name__ == "__main__":
    main()
