"""OAL (paper 003): does outlier-aware learning from a strong teacher improve OOD detection (energy score) of networks
trained on a distilled set, without costing accuracy?

A full-data teacher (``fastdd teacher``, wider than the students) teaches every OAL arm. Two settings:

- **train on distilled**: fresh networks trained on the distilled set (the evaluation protocol);
- **fine-tune** (the paper's setting): every network starts from a trained full-data network of the evaluation
  architecture (``--init``, another ``fastdd teacher`` run: fewer epochs, other seed) and is fine-tuned on the
  distilled set with a small learning rate.

Arms in each setting: ``ce`` (cross-entropy), ``idkd`` (OAL's distillation terms only, ``--oal-beta 0``), ``oal``
(the full loss), each OAL arm in fastdd's recipe and in the authors' (``--oal-recipe authors --oal-kl
teacher-student``). Every arm of a setting trains from the same evaluation seed (run i of each arm starts from the
same weights and draws the same minibatches), so arms are paired by run: mean ± std over runs and paired differences
with 95 % intervals. OOD sets: Gaussian and uniform noise and another dataset; AUROC / FPR95 are means over them.

Run (each step is skipped when its output exists)::

    python examples/reproduce_oal.py runs/mdt-digits-r0 --ood gaussian,uniform,fashion-mnist --runs 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from repro_common import arms_table, differences_table, evaluate, fastdd, parallel, say, this_command, write_results

OAL_ARMS = {
    "idkd": ["--oal-beta", "0"],
    "oal": [],
    "idkd-authors": ["--oal-beta", "0", "--oal-recipe", "authors", "--oal-kl", "teacher-student"],
    "oal-authors": ["--oal-recipe", "authors", "--oal-kl", "teacher-student"],
}
METRICS = ["acc", "energy auroc", "energy fpr95", "msp auroc", "msp fpr95", "ece"]
BETTER = {"acc": 1, "energy auroc": 1, "energy fpr95": -1, "msp auroc": 1, "msp fpr95": -1, "ece": -1}


def network(out: Path, options: list[str], log: Path) -> None:
    if not (out / "network.json").exists():
        fastdd(["teacher", *options, "--out", out, "--quiet", "--overwrite"], log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("synset", type=Path, help="a folder written by fastdd distill")
    parser.add_argument("--ood", default="gaussian,uniform,fashion-mnist")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=300, help="evaluation epochs when training on distilled")
    parser.add_argument("--finetune-epochs", type=int, default=50)
    parser.add_argument("--finetune-lr", type=float, default=0.001)
    parser.add_argument("--teacher-width", type=int, default=256)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--init-epochs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()

    meta = json.loads((args.synset / "synset.json").read_text())
    dataset, hyper = meta["dataset"], meta.get("hyperparameters", {})
    folder = args.synset / "repro-oal"
    log = folder / "oal.log"
    teacher, init = folder / "teacher", folder / "init"
    data = ["--dataset", dataset]
    teacher_options = [*data, "--width", str(args.teacher_width), "--epochs", str(args.teacher_epochs)]
    init_options = [*data, "--width", str(hyper.get("width", 128)), "--epochs", str(args.init_epochs), "--seed", "1"]
    if hyper.get("depth") is not None:
        init_options += ["--depth", str(hyper["depth"])]
    parallel([lambda: network(teacher, teacher_options, log), lambda: network(init, init_options, log)], args.jobs)

    common = ["--runs", str(args.runs), "--ood", args.ood, "--score", "energy,msp", "--calibration", "none"]
    settings = {
        "distilled": ["--epochs", str(args.epochs)],
        "finetune": ["--epochs", str(args.finetune_epochs), "--lr", str(args.finetune_lr), "--init", str(init)],
    }
    calls = {}
    for setting, options in settings.items():
        calls[f"{setting}/ce"] = [*common, *options]
        for arm, extra in OAL_ARMS.items():
            calls[f"{setting}/{arm}"] = [*common, *options, "--train-plugin", "oal", "--teacher", str(teacher), *extra]

    def job(name: str):
        def run() -> None:
            evaluate(args.synset, calls[name], folder / f"{name.replace('/', '-')}.json", log)
            say(f"done: {name}")
        return run

    parallel([job(name) for name in calls], args.jobs)

    def values(name: str) -> dict[str, list[float]]:
        model = json.loads((folder / f"{name.replace('/', '-')}.json").read_text())["models"]["convnet"]
        out = {"acc": model["acc"]["runs"], "ece": model["calibration"]["none"]["ece"]["runs"]}
        for score in ("energy", "msp"):
            for metric in ("auroc", "fpr95"):
                out[f"{score} {metric}"] = model["ood"][score]["mean"][metric]["runs"]
        return out

    teacher_meta = json.loads((teacher / "network.json").read_text())
    init_meta = json.loads((init / "network.json").read_text())
    parts = [
        f"OAL on {dataset} ({meta['method']}, IPC {meta['ipc']}; set {args.synset}); teacher: ConvNet width "
        f"{args.teacher_width}, {args.teacher_epochs} epochs on all training images, test accuracy "
        f"{teacher_meta['test_accuracy']:.2f} %; OOD sets {args.ood} (AUROC / FPR95 in %, means over the sets); "
        f"ECE in % (15 bins); {args.runs} networks per arm, mean ± std over networks.",
    ]
    for setting in settings:
        arms = {arm: values(f"{setting}/{arm}") for arm in ["ce", *OAL_ARMS]}
        pairs = [(a, "ce") for a in OAL_ARMS] + [("oal", "idkd"), ("oal-authors", "idkd-authors"),
                                                  ("oal-authors", "oal")]
        heading = ("Setting: train on distilled (fresh networks, the evaluation protocol, "
                   f"{args.epochs} epochs)." if setting == "distilled" else
                   f"Setting: fine-tune (every network starts from a full-data ConvNet of the evaluation "
                   f"architecture, {args.init_epochs} epochs, test accuracy {init_meta['test_accuracy']:.2f} %; "
                   f"{args.finetune_epochs} epochs at lr {args.finetune_lr} on the distilled set).")
        parts += [heading, arms_table(arms, METRICS),
                  "Paired differences (per network), mean [95 % interval] and verdict:",
                  differences_table(arms, pairs, METRICS, better=BETTER)]
    parts.append(
        f"Command: `{this_command()}`; teacher: `fastdd teacher {' '.join(teacher_options)}`; init: `fastdd teacher "
        f"{' '.join(init_options)}`; evaluations: `fastdd evaluate SET {' '.join(common)}` + the setting's "
        "options (" + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in settings.items()) + ") + the arm's (OAL: "
        "`--train-plugin oal --teacher TEACHER` and " + "; ".join(f"{k}: `{' '.join(v) or '(none)'}`"
                                                             for k, v in OAL_ARMS.items()) + ")."
    )
    write_results(args.results, "\n\n".join(parts))


if __name__ == "__main__":
    main()
