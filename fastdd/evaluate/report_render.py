"""The trust report's human side: report.md (`render_markdown`) and the summary bar charts (`save_summary_chart`),
both made from the content of report.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastdd.io import atomic_write

REPORT_JSON = "report.json"
SUMMARY_PREFIX = "summary_"
# The robustness measures and calibration methods in the headline table (cluster_mean is in report.json only).
HEADLINE_ROBUSTNESS = ("cluster_min", "noise", "blur", "invert")
CALIBRATION_LABELS = {"none": "ECE raw", "ts": "ECE TS", "mts": "ECE MTS"}


def _headline_metrics(report: dict[str, Any]) -> list[tuple[str, Callable[[dict], dict | None], bool]]:
    """``(label, getter of a model's result -> {"mean", "std"} or None, lower is better)`` per headline column."""
    protocol = report["protocol"]

    def path(*keys: str) -> Callable[[dict], dict | None]:
        def get(res: dict) -> dict | None:
            for key in keys:
                if not isinstance(res, dict) or key not in res:
                    return None
                res = res[key]
            return res

        return get

    columns: list[tuple[str, Callable[[dict], dict | None], bool]] = [("acc %", path("acc"), False)]
    for score in protocol["scores"]:
        columns.append((f"AUROC {score}", path("ood", score, "mean", "auroc"), False))
        columns.append((f"FPR95 {score}", path("ood", score, "mean", "fpr95"), True))
    for name in HEADLINE_ROBUSTNESS:
        if name in protocol["robustness"]:
            columns.append((name, path("robustness", name), False))
    for method in protocol["calibration"]:
        columns.append((CALIBRATION_LABELS[method], path("calibration", method, "ece"), True))
    if protocol.get("label_scores"):
        columns += [("HLR", path("label_scores", "hlr"), True), ("IOR", path("label_scores", "ior"), False),
                    ("LRS", path("label_scores", "lrs"), False)]
    return columns


def save_summary_chart(report: dict[str, Any], model: str, path: str | Path) -> None:
    """A grouped bar chart of one model's headline metrics (accuracy, mean AUROC per score, robustness, ECE), one bar
    per set with its std over runs as an error bar, written atomically as a PNG."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [(label.removesuffix(" %"), get, lower) for label, get, lower in _headline_metrics(report)
               if not label.startswith("FPR95")]
    sets = report["sets"]
    figure = Figure(figsize=(max(6.4, 1.0 + 0.9 * len(columns) * max(1, len(sets)) ** 0.5), 4.4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    x = np.arange(len(columns))
    width = 0.8 / max(1, len(sets))
    for i, entry in enumerate(sets):
        res = entry["results"]["models"][model]
        values = [get(res) for _, get, _ in columns]
        means = [v["mean"] if v else np.nan for v in values]
        stds = [v["std"] if v else 0.0 for v in values]
        axes.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=2, label=entry["name"])
    axes.set_xticks(x, [label + (" ↓" if lower else "") for label, _, lower in columns], rotation=30, ha="right")
    axes.set_ylabel("percent (↓: lower is better)")
    axes.set_ylim(0, 105)
    axes.set_title(f"{report['dataset']}, {model}: mean ± std over {_count(report['protocol']['runs'], 'run')}")
    axes.legend(fontsize="small")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def render_markdown(report: dict[str, Any]) -> str:
    """The Markdown text of report.md for the content of report.json."""
    protocol, machine, sets = report["protocol"], report["machine"], report["sets"]
    first = sets[0]["results"]
    ood_sizes = ", ".join(f"{name} ({n} per side)" for name, n in first["ood_sets"].items())
    lr = f"lr {protocol['lr']:g}" if protocol["lr"] is not None else "lr per set (its learned lr, else 0.01)"
    lines = [
        f"# Trust report: {report['dataset']}",
        "",
        f"- **Sets**: {', '.join(entry['name'] for entry in sets)}",
        f"- **Protocol**: models {', '.join(protocol['models'])}; {_count(protocol['runs'], 'run')} of "
        f"{_count(protocol['epochs'], 'epoch')}, {lr}, batch {protocol['batch_size']}, DSA {'on' if protocol['dsa'] else 'off'}, seed "
        f"{protocol['seed']}; outlier images of TrustDD sets "
        f"{'trained on (integrated loss)' if protocol['use_outliers'] else 'ignored'}"
        + (f"; networks trained on classes < {protocol['holdout']}" if protocol["holdout"] is not None else ""),
        f"- **OOD**: {ood_sizes}; scores {', '.join(protocol['scores'])}",
        f"- **Robustness**: {', '.join(protocol['robustness']) or 'not measured'}",
        f"- **Calibration**: {', '.join(protocol['calibration'])} (MTS mask ratio {protocol['mask_ratio']}; TS "
        "networks train on 90 % of each class)",
        *(["- **DD-Ranking scores**: HLR = full-data minus hard-label accuracy, IOR = hard-label minus random-subset "
           "accuracy (same protocol), LRS = their label-robust score (weight 0.5), all in %"]
          if protocol.get("label_scores") else []),
        f"- **Machine**: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
        f"({machine['torch_threads']} threads, {machine['device']}), fastdd {report['fastdd_version']}",
        f"- **Date**: {report['created']}",
        "",
        "All numbers are mean ± std over runs, in percent. Higher is better, except FPR95 (OOD accepted at 95 % ID "
        "recall) and ECE (15 bins). AUROC and FPR95 are means over the OOD sets.",
        "",
        "## Sets",
        "",
    ]
    lines += _table(
        ["set", "method", "IPC", "images", "outlier images", "outliers", "robust", "MDT", "lr", "size",
         "distillation time"],
        [
            [entry["name"], str(entry["method"]), str(entry["ipc"]), str(entry["images"]), str(entry["outlier_images"]),
             entry["outliers"], _yes(entry["robust"]),
             f"yes ({entry['mdt_mask_ratio']})" if entry["mdt"] else "no", f"{entry['results']['lr']:g}",
             _size(entry["size_bytes"]), _duration(entry["distill_seconds"])]
            for entry in sets
        ],
    )
    notes = [f"- {entry['name']}: {note}" for entry in sets for note in entry["notes"]]
    if notes:
        lines += ["", "Notes:", "", *notes]
    columns = _headline_metrics(report)
    for model in protocol["models"]:
        lines += ["", f"## {model}", ""]
        rows = []
        for entry in sets:
            res = entry["results"]["models"][model]
            rows.append([entry["name"], *(_pm(get(res)) for _, get, _ in columns),
                         _size(entry["size_bytes"]), _duration(entry["distill_seconds"])])
        lines += _table(["set", *(label + (" ↓" if lower else "") for label, _, lower in columns), "size",
                         "distillation time"], rows)
    for model in protocol["models"]:
        for score in protocol["scores"]:
            names = [name for name in first["ood_sets"]]
            lines += ["", f"### {model}, {score}: per OOD set", ""]
            rows = []
            for entry in sets:
                ood = entry["results"]["models"][model]["ood"][score]
                rows.append([entry["name"], *(cell for name in names for cell in
                                              (_pm(ood[name]["auroc"]), _pm(ood[name]["fpr95"])))])
            lines += _table(["set", *(f"{name} {m}" for name in names for m in ("AUROC", "FPR95 ↓"))], rows)
    lines += ["", "## Plots", ""]
    for model in protocol["models"]:
        lines += [f"![{model}]({SUMMARY_PREFIX}{model}.png)", ""]
    lines += [f"- [{p}]({p})" for p in report["plots"]]
    lines += ["", f"Raw numbers (every run) are in {REPORT_JSON}.", ""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [row(header), "|" + "|".join("---" for _ in header) + "|", *(row(r) for r in rows)]


def _pm(summary: dict | None) -> str:
    if not summary:
        return "–"
    return f"{summary['mean']:.2f} ± {summary['std']:.2f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1024**2:
        return f"{size / 1024:.1f} KiB"
    return f"{size / 1024**2:.1f} MiB"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
