"""What ``--precision bf16`` does to distilled accuracy: the same distillations in fp32 and bf16, same seeds.

For each (dataset, method) case, every seed is distilled twice, ``--precision fp32`` and ``--precision bf16``, with
everything else equal (same seed, so the same initial images, draws and, for ``tesla``, the same float32 experts
trained once beforehand). Every set is then evaluated in float32 with the same evaluation seed, so the two arms of a
seed are scored by networks trained the same way: the only difference is how the set was distilled. The unit is a
distillation seed (its accuracy = the mean over the set's evaluation networks); the table gives mean ± std over seeds
and the paired difference bf16 - fp32 with its 95 % interval, plus the seconds per distillation iteration of each arm
(one torch thread; on a shared machine a rough guide, the benchmarks measure speed), and how far each bf16 set lies
from the fp32 set of its seed as a fraction of how far the fp32 distillation moved its images from their start.

Cases (chosen to fit a CPU session; ``--cases`` picks some):

- ``digits-tesla``: digits, tesla, IPC 10, 100 iterations (the dataset's preset otherwise), 5 experts of 12 epochs;
- ``digits-dsa``: digits, dsa, IPC 1, 200 iterations;
- ``fm-tesla``: Fashion-MNIST, tesla, IPC 1, 100 iterations, 2 experts of 4 epochs;
- ``fm-dsa``: Fashion-MNIST, dsa, IPC 1, 40 iterations.

Run (every step resumes or is skipped when its output exists, so the script can be stopped and started again)::

    python examples/precision_effect.py --seeds 0 1 2 --jobs 2 --results docs/results/precision/bf16-accuracy.md
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from repro_common import (
    arms_table,
    differences_table,
    distill,
    evaluate,
    fastdd,
    parallel,
    say,
    this_command,
    write_results,
)

from fastdd.data import load_dataset
from fastdd.distill import get_distiller
from fastdd.io import SyntheticSet

ARMS = {"fp32": [], "bf16": ["--precision", "bf16"]}
CASES = {
    "digits-tesla": {"dataset": "digits", "method": "tesla", "distill": ["--ipc", "10", "--iterations", "100"],
                     "experts": ["--num-experts", "5", "--epochs", "12"]},
    "digits-dsa": {"dataset": "digits", "method": "dsa", "distill": ["--ipc", "1", "--iterations", "200"]},
    "fm-tesla": {"dataset": "fashion-mnist", "method": "tesla", "distill": ["--ipc", "1", "--iterations", "100"],
                 "experts": ["--num-experts", "2", "--epochs", "4"]},
    "fm-dsa": {"dataset": "fashion-mnist", "method": "dsa", "distill": ["--ipc", "1", "--iterations", "40"]},
}


def seconds_per_iteration(run: Path) -> float | None:
    """The run's wall seconds per iteration, from the last line of its metrics.jsonl (None when absent)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = lines[-1] if lines else None
    return last["seconds"] / last["iteration"] if last and last.get("iteration") else None


def start_images(run: Path) -> torch.Tensor:
    """The images the run's distillation started from: a fresh distiller of its recorded settings (same seed)."""
    meta = json.loads((run / "synset.json").read_text())
    method = meta["method"]
    cls = get_distiller(method)
    config = cls.config_class.from_options(dict(meta["hyperparameters"]), method=method)
    dataset = load_dataset(config.dataset, data_root=config.data_root, image_size=config.image_size,
                           zca=bool(getattr(config, "zca", False)))
    return cls(config, dataset).images.detach()


def relative_drift(run: Path, reference: Path) -> float:
    """``||S_run - S_reference|| / ||S_reference - S_0||``: how far the run's images are from the reference run's,
    as a fraction of how far the reference's distillation moved them from its start ``S_0``."""
    images = SyntheticSet.load(run).images
    reference_images = SyntheticSet.load(reference).images
    moved = (reference_images - start_images(reference)).norm()
    return float((images - reference_images).norm() / moved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-runs", type=int, default=3, help="evaluation networks per distilled set")
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs")
    parser.add_argument("--jobs", type=int, default=1, help="pipelines run side by side, one torch thread each")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/precision"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy every run's metrics, log and evaluation JSON into this folder (kept in the repo)")
    parser.add_argument("--results", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args()

    root = args.runs_dir
    evaluation = ["--runs", str(args.eval_runs), "--epochs", str(args.epochs)]
    for name in args.cases:  # experts first, one at a time: the distillations of a case share them
        case = CASES[name]
        if "experts" in case:
            folder = root / f"experts-{case['dataset']}"
            if not (folder / "done").exists():
                say(f"training the experts of {name} in {folder}")
                fastdd(["experts", "--dataset", case["dataset"], *case["experts"], "--out", folder, "--quiet"],
                       root / f"experts-{case['dataset']}.log", threads=max(1, args.jobs))
                (folder / "done").write_text("")

    def pipeline(name: str, arm: str, seed: int):
        def run() -> None:
            case = CASES[name]
            out = root / name / f"{arm}-s{seed}"
            log = root / name / f"{arm}-s{seed}.log"
            options = ["--method", case["method"], "--dataset", case["dataset"], *case["distill"], *ARMS[arm],
                       "--seed", str(seed)]
            if "experts" in case:
                options += ["--experts", str(root / f"experts-{case['dataset']}")]
            distill(out, options, log)
            evaluate(out, evaluation, out / "eval.json", log)
            say(f"done: {name} {arm} seed {seed}")
        return run

    jobs = [pipeline(name, arm, seed) for name in args.cases for seed in args.seeds for arm in args.arms]
    parallel(jobs, args.jobs)

    sections = []
    for name in args.cases:
        case = CASES[name]
        arms = {}
        for arm in args.arms:
            runs = [root / name / f"{arm}-s{seed}" for seed in args.seeds]
            arms[arm] = {
                "acc": [json.loads((r / "eval.json").read_text())["models"]["convnet"]["acc"]["mean"] for r in runs],
                "s/iteration": [seconds_per_iteration(r) or float("nan") for r in runs],
            }
            if args.keep is not None:
                for seed, r in zip(args.seeds, runs):
                    target = args.keep / name
                    target.mkdir(parents=True, exist_ok=True)
                    for source, suffix in ((r / "metrics.jsonl", "metrics.jsonl"), (r / "eval.json", "eval.json"),
                                           (root / name / f"{arm}-s{seed}.log", "log")):
                        if source.exists():
                            shutil.copyfile(source, target / f"{arm}-s{seed}-{suffix}")
        pairs = [("bf16", "fp32")] if {"bf16", "fp32"} <= set(arms) else []
        drift = ""
        if pairs:
            drifts = [relative_drift(root / name / f"bf16-s{seed}", root / name / f"fp32-s{seed}")
                      for seed in args.seeds]
            drift = (" The bf16 set's distance to the fp32 set of its seed, as a fraction of how far the fp32 "
                     "distillation moved its images from their start: "
                     + ", ".join(f"{d:.3f}" for d in drifts) + " (seeds in order).")
        sections += [
            f"**{name}**: {case['dataset']}, {case['method']}, `{' '.join(case['distill'])}`; "
            f"seeds {' '.join(map(str, args.seeds))}; accuracy in % (float32 evaluation, {args.eval_runs} networks x "
            f"{args.epochs} epochs per set, mean over them), mean ± std over seeds." + drift,
            arms_table(arms, ["acc", "s/iteration"], digits=2),
        ]
        if pairs:
            sections += ["Paired by seed:", differences_table(arms, pairs, ["acc", "s/iteration"],
                                                              better={"acc": 1, "s/iteration": -1}, digits=2)]
    sections.append(f"Command: `{this_command()}`; distillation: `fastdd distill --method M --dataset D <case "
                    f"options> [--precision bf16] --seed S [--experts EXPERTS]`; evaluation: `fastdd evaluate RUN "
                    f"{' '.join(evaluation)}`.")
    write_results(args.results, "\n\n".join(sections))


if __name__ == "__main__":
    main()
