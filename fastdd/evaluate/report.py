"""The trust report: several synthetic sets evaluated under one protocol and compared side by side.

`trust_report` trains and scores networks on each synthetic set with one `fastdd.evaluate.plan.EvalPlan` per set (the
same `EvaluationSettings` for all, the test side built once for the sets of one dataset) and writes into one
folder:

* ``report.json``: the protocol, the machine, and per set its metadata (method, IPC, trust flags, size, distillation
  time) and the unmodified result of `evaluate_synthetic_set` (plot paths made relative to the folder);
* ``report.md``: the same as Markdown tables, one side-by-side table per model (accuracy, mean OOD AUROC / FPR95
  per score, robustness, ECE raw / TS / MTS, size, distillation time; mean ± std over runs), then AUROC / FPR95 per
  OOD set;
* ``summary_<model>.png``: a grouped bar chart of the headline metrics, one group per metric, one bar per set;
* ``plots/<set>/``: the OOD score histograms, reliability diagrams and max-logit histograms of each set.

Everything is checked, then built, before the first network trains (`prepare_report`), and the files are written
into a hidden staging folder inside the output folder and moved into place only when the whole report is done, so a
failed or interrupted report leaves the folder as it was.
"""

from __future__ import annotations

import dataclasses

import json
import math
import os
import platform
import re
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from fastdd.data import ImageDataset
from fastdd.errors import FastddError
from fastdd.evaluate.calibration_runs import CALIBRATIONS, TS_HOLDOUT_FRACTION, parse_calibrations
from fastdd.evaluate.ood_sets import holdout_spec, parse_ood_sets
from fastdd.config.evaluate import EvaluationSettings
from fastdd.evaluate.options import EvalOptions, check_evaluation_options, evaluation_settings, evaluation_task
from fastdd.evaluate.plan import EvalPlan, EvalTestData, build_plan
from fastdd.evaluate.protocol import dataset_for_synset
from fastdd.evaluate.report_render import REPORT_JSON, SUMMARY_PREFIX, render_markdown, save_summary_chart
from fastdd.evaluate.robustness import ROBUSTNESS_SETS, parse_robustness_sets
from fastdd.io import METRICS, SYNSET_TENSORS, SyntheticSet, atomic_write, write_json
from fastdd.trust.masking import DEFAULT_MASK_RATIO

REPORT_FORMAT = "fastdd-report/1"
REPORT_MD = "report.md"
PLOTS_FOLDER = "plots"
DEFAULT_REPORT_OOD = ("gaussian", "uniform")  # built offline for every dataset
DEFAULT_REPORT_SCORES = ("msp", "energy")
# What a report measures when not told otherwise: everything (its keyword form; ReportConfig's defaults match).
REPORT_DEFAULTS: dict[str, Any] = {
    "ood": DEFAULT_REPORT_OOD, "scores": DEFAULT_REPORT_SCORES, "robustness": ROBUSTNESS_SETS,
    "calibration": CALIBRATIONS,
}

# on_epoch(set name, model, run, epoch) after every training epoch of every network
ReportProgress = Callable[[str, str, int, int], None]


@dataclass
class ReportSet:
    """One synthetic set of a report.

    Attributes:
        name: its name in the tables (the folder name, or the key given; deduplicated).
        folder: its subfolder of ``plots/`` (the name with unsafe characters replaced; deduplicated).
        path: the folder it was read from, or None for a set given in memory.
        synset: the set.
        dataset: its real dataset (shared by the sets with the same dataset settings).
        calibration: the calibration methods evaluated for it (``ts`` dropped when a class has a single image).
        plan: its evaluation, built once by `prepare_report` and run by `ReportPlan.run` (its plots go to the
            report's staging folder).
        info: its metadata row of report.json (method, IPC, flags, size, distillation time, notes).
    """

    name: str
    folder: str
    path: str | None
    synset: SyntheticSet
    dataset: ImageDataset
    calibration: tuple[str, ...]
    plan: EvalPlan
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReportPlan:
    """A validated report, ready to run: made by `prepare_report`; nothing is written or trained until `run`.

    ``staging`` is the hidden folder inside ``out`` that `run` writes into before moving the files into place.
    """

    out: Path
    sets: list[ReportSet]
    settings: EvaluationSettings  # the evaluation of every set (each set's plan varies only plots and calibration)
    models: list[str]
    robustness: tuple[str, ...]
    calibration: tuple[str, ...]
    overwrite: bool
    staging: Path

    @property
    def total_epochs(self) -> int:
        """Training epochs of the whole report (for a progress bar): per set, model and run one network, two with TS."""
        return sum(s.plan.total_epochs for s in self.sets)

    def run(self, on_epoch: ReportProgress | None = None) -> dict[str, Any]:
        """Evaluate every set, write the report into ``out`` and return the content of report.json."""
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        staging = self.staging
        staging.mkdir()
        try:
            entries = []
            for report_set in self.sets:
                callback = (
                    (lambda model, run, epoch, n=report_set.name: on_epoch(n, model, run, epoch)) if on_epoch else None
                )
                result = report_set.plan.run(callback)
                result["plots"] = [Path(p).relative_to(staging).as_posix() for p in result.get("plots", [])]
                entries.append({**report_set.info, "results": result})
            report = self._report(entries)
            summaries = []
            for model in self.models:
                name = f"{SUMMARY_PREFIX}{model}.png"
                save_summary_chart(report, model, staging / name)
                summaries.append(name)
            report["plots"] = summaries + [p for entry in entries for p in entry["results"]["plots"]]
            write_json(staging / REPORT_JSON, report)
            markdown = render_markdown(report)
            atomic_write(staging / REPORT_MD, lambda tmp: Path(tmp).write_text(markdown))
            self._commit(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            if created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()
            raise
        return report

    def _report(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        import fastdd

        first = entries[0]["results"]
        return {
            "format": REPORT_FORMAT,
            "fastdd_version": fastdd.__version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "device": self.settings.device,
            },
            "dataset": first["dataset"],
            "protocol": {
                "models": list(self.models),
                "runs": self.settings.runs,
                "epochs": self.settings.epochs_or_default(),
                "lr": self.settings.lr,
                "dsa": self.settings.dsa,
                "seed": self.settings.seed,
                "batch_size": self.settings.batch_size,
                "ood": list(first["ood_sets"]),
                "ood_size": self.settings.ood_size,
                "scores": list(first["scores"]),
                "robustness": list(self.robustness),
                "calibration": list(self.calibration),
                "mask_ratio": DEFAULT_MASK_RATIO if self.settings.mask_ratio is None else self.settings.mask_ratio,
                "use_outliers": self.settings.use_outliers,
                "holdout": first["holdout"],
                "data_root": self.settings.data_root,
                "label_scores": self.settings.label_scores,
            },
            "sets": entries,
        }

    def _commit(self, staging: Path) -> None:
        """Move the staged report into ``out``; with ``overwrite`` the files of an earlier report go first."""
        if self.overwrite:
            for old in [self.out / REPORT_JSON, self.out / REPORT_MD, *self.out.glob(f"{SUMMARY_PREFIX}*.png")]:
                old.unlink(missing_ok=True)
            if (self.out / PLOTS_FOLDER).is_dir():
                shutil.rmtree(self.out / PLOTS_FOLDER)
        for item in staging.iterdir():
            os.replace(item, self.out / item.name)
        staging.rmdir()


def trust_report(
    synsets: Mapping[str, SyntheticSet | str | Path] | Sequence[str | Path],
    *,
    out: str | Path,
    overwrite: bool = False,
    on_epoch: ReportProgress | None = None,
    settings: EvaluationSettings | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Evaluate synthetic sets of one dataset under one protocol and write a side-by-side trust report into ``out``.

    Each set is evaluated by one plan with the same ``settings`` (so its numbers are exactly those of ``fastdd
    evaluate`` with the same options): OOD sets, OOD scores, robustness measures and calibration methods. Temperature scaling (``ts``) holds out synthetic images of
    every class, so a set with a class of a single image (IPC 1) is evaluated without ``ts`` and the report says so
    in that set's ``notes``; the other sets keep it.

    Everything is validated before any network trains (see `prepare_report`); the files appear in ``out`` only when
    the whole report is done.

    Args:
        synsets: folders written by ``fastdd distill`` (named by their folder name, deduplicated with ``-2``, ``-3``,
            ...), or a mapping from names to sets or folders.
        out: the report folder; refused when it exists and is not empty, unless ``overwrite``.
        overwrite: replace an earlier report in ``out`` (its report.json, report.md, summary PNGs and plots/).
        on_epoch: ``on_epoch(set name, model, run, epoch)`` after every training epoch.
        settings: the evaluation of every set (`fastdd.config.evaluate.EvaluationSettings`; its ``plots`` is
            ignored), or None to make it from ``keywords`` as `fastdd.evaluate.options.evaluation_settings` does,
            with the report's defaults: OOD sets gaussian and uniform noise, scores msp and energy, every robustness
            measure, calibration none, ts and mts.

    Returns:
        The content of report.json: ``{"format", "fastdd_version", "created", "machine": {"platform", "machine",
        "cpu_count", "python", "torch", "torch_threads", "device"}, "dataset", "protocol": {"models", "runs",
        "epochs", "lr", "dsa", "seed", "batch_size", "ood", "ood_size", "scores", "robustness", "calibration",
        "mask_ratio", "use_outliers", "holdout", "data_root"}, "sets": [...], "plots": [...]}``. Each entry of
        ``sets`` (in the order given) holds ``name``, ``path`` (None in memory), ``method``, ``dataset``, ``ipc``,
        ``images``, ``outlier_images``, ``soft_labels``, ``outliers`` (``none``/``oe``/``poe``), ``robust``,
        ``mdt``, ``mdt_mask_ratio``, ``seed``, ``size_bytes`` (of synset.safetensors; for a set in memory, of its
        serialisation), ``distill_seconds`` (see `distillation_seconds`; None without metrics.jsonl), ``calibration``
        (the methods evaluated), ``notes`` and ``results``: the dict `evaluate_synthetic_set` returned, its
        ``plots`` relative to ``out``. ``plots`` lists every PNG written, relative to ``out``.
    Raises:
        FastddError: a missing or unreadable set, sets of different datasets, an existing non-empty ``out`` without
            ``overwrite``, or an invalid option; all before any training.
    """
    plan = prepare_report(synsets, out=out, overwrite=overwrite, settings=settings, **keywords)
    return plan.run(on_epoch)


def prepare_report(
    synsets: Mapping[str, SyntheticSet | str | Path] | Sequence[str | Path],
    *,
    out: str | Path,
    overwrite: bool = False,
    settings: EvaluationSettings | None = None,
    **keywords: Any,
) -> ReportPlan:
    """Check every input of `trust_report` (same arguments), load the sets and their dataset, and build each set's
    evaluation plan once; train nothing and write nothing.

    Every option of every set is checked first (`check_evaluation_options`: OOD sets, scores, holdout classes, mask
    ratio, outliers, ...), before anything expensive is built; then each set's plan is built (`build_plan`), the sets
    of one dataset sharing one test side (OOD sets, KMeans clusters, corrupted test images), and `ReportPlan.run`
    runs those very plans.

    Raises:
        FastddError: see `trust_report`.
    """
    if settings is None:
        settings = evaluation_settings(**{**REPORT_DEFAULTS, **keywords})
    elif keywords:
        raise TypeError(f"prepare_report takes settings or keywords, not both (got {', '.join(keywords)})")
    base = settings
    model_names = list(dict.fromkeys(base.models.split(",")))
    ood_names = base.ood.split(",") if base.ood else []
    parse_ood_sets(ood_names)  # names and folders; holdout:K ranges once the dataset is known
    if not ood_names:
        raise FastddError("the report needs at least one OOD set; pass --ood gaussian,uniform or other sets.")
    chosen_robustness = base.chosen_robustness()
    robustness_sets = parse_robustness_sets(chosen_robustness) if chosen_robustness is not None else ()
    calibrations = parse_calibrations(base.calibration) if base.calibration else ()
    out = Path(out)
    _check_out(out, overwrite)
    named = _read_sets(synsets)
    _check_one_dataset(named)

    staging = out / f".report-staging-{uuid.uuid4().hex[:8]}"
    loaded: dict[tuple, ImageDataset] = {}
    checked: list[tuple[str, str, str | None, EvalOptions, dict[str, Any]]] = []
    for (name, path, synset), folder in zip(named, _unique([_folder_name(name) for name, _, _ in named])):
        dataset = _dataset_for(synset, base.data_root, loaded)
        chosen, notes = _calibrations_for(synset, dataset, ood_names, calibrations)
        settings = dataclasses.replace(
            base, plots=str(staging / PLOTS_FOLDER / folder), calibration=",".join(chosen) or None
        )
        options = check_evaluation_options(synset, dataset, settings)
        info = {**_set_info(name, path, synset), "calibration": list(chosen), "notes": notes}
        checked.append((name, folder, path, options, info))

    shared: dict[tuple[int, int | None], EvalTestData] = {}  # (dataset, holdout K) -> its test side
    sets = []
    for name, folder, path, options, info in checked:
        key = (id(options.dataset), options.task.holdout)
        plan = build_plan(options, test_data=shared.get(key))
        shared.setdefault(key, plan.test_data)
        sets.append(ReportSet(name, folder, path, options.synset, options.dataset, options.calibration, plan, info))
    return ReportPlan(
        out=out, sets=sets, settings=base, models=model_names, robustness=robustness_sets, calibration=calibrations,
        overwrite=overwrite, staging=staging,
    )


def distillation_seconds(folder: str | Path) -> float | None:
    """The distillation time of a run folder: the ``seconds`` of its last ``metrics.jsonl`` record.

    ``seconds`` is the wall-clock time of the distillation iterations since the run (or its last ``--resume``)
    started; data loading and expert training are not in it. A resumed run restarts that clock, so when ``seconds``
    drops between two records the time reached before the drop is added. None when the file is missing or holds no
    ``seconds``; unreadable lines are skipped.
    """
    path = Path(folder) / METRICS
    if not path.is_file():
        return None
    total, last = 0.0, None
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        seconds = record.get("seconds") if isinstance(record, dict) else None
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
            continue
        if last is not None and seconds < last:
            total += last
        last = float(seconds)
    return None if last is None else total + last


# ------------------------------------------------------------------------------------------------------- inputs


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FastddError(f"the report folder {out} is a file; choose another --out.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FastddError(f"the report folder {out} is not empty; pass --overwrite to replace the report in it or "
                          "choose another --out.")


def _read_sets(
    synsets: Mapping[str, SyntheticSet | str | Path] | Sequence[str | Path],
) -> list[tuple[str, str | None, SyntheticSet]]:
    """``(name, folder or None, set)`` per set, names deduplicated."""
    if isinstance(synsets, (str, Path)):
        synsets = [synsets]
    if isinstance(synsets, Mapping):
        items = []
        for name, value in synsets.items():
            if not isinstance(name, str) or not name.strip():
                raise FastddError(f"a synthetic set needs a non-empty name, got {name!r}.")
            items.append((name.strip(), value))
    else:
        items = [(_path_name(Path(value)), value) for value in synsets]
    if not items:
        raise FastddError("the report needs at least one synthetic set folder.")
    names = _unique([name for name, _ in items])
    result = []
    for name, (_, value) in zip(names, items):
        if isinstance(value, SyntheticSet):
            result.append((name, None, value))
            continue
        folder = Path(value)
        if not folder.is_dir():
            raise FastddError(f"the synthetic set folder {folder} does not exist.")
        result.append((name, str(folder), SyntheticSet.load(folder)))
    return result


def _path_name(path: Path) -> str:
    return path.name if path.name not in ("", ".", "..") else path.resolve().name or "set"


def _folder_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "set"


def _unique(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, k = name, 2
        while candidate in seen:
            candidate, k = f"{name}-{k}", k + 1
        seen.add(candidate)
        result.append(candidate)
    return result


def _check_one_dataset(named: list[tuple[str, str | None, SyntheticSet]]) -> None:
    datasets_named = {name: s.meta.get("dataset") for name, _, s in named}
    missing = [name for name, value in datasets_named.items() if not value]
    if missing:
        raise FastddError(f"the synthetic set {missing[0]} does not name its dataset in synset.json; it was not "
                          "written by fastdd.")
    if len(set(datasets_named.values())) > 1:
        listed = ", ".join(f"{name} ({value})" for name, value in datasets_named.items())
        raise FastddError(f"the synthetic sets come from different datasets: {listed}; a report compares sets of one "
                          "dataset, so make one report per dataset.")


def _dataset_for(synset: SyntheticSet, data_root: str | None, loaded: dict[tuple, ImageDataset]) -> ImageDataset:
    """The set's real dataset, loaded once per dataset settings (``loaded`` caches them)."""
    meta = synset.meta
    key = (meta["dataset"], data_root if data_root is not None else meta.get("data_root"),
           meta.get("image_size"), bool(meta.get("zca", False)))
    dataset = loaded.get(key)
    if dataset is None or tuple(synset.images.shape[1:]) != (dataset.channels, *dataset.image_size):
        dataset = dataset_for_synset(synset, data_root=data_root)  # raises the shape mismatch, if any
        loaded.setdefault(key, dataset)
    return dataset


def _calibrations_for(
    synset: SyntheticSet, dataset: ImageDataset, ood_names: list[str], calibrations: tuple[str, ...]
) -> tuple[tuple[str, ...], list[str]]:
    """The calibration methods of one set (``ts`` dropped when a class it trains on has a single synthetic image)
    and the notes saying so."""
    if "ts" not in calibrations:
        return calibrations, []
    single = _single_image_class(synset, dataset, parse_ood_sets(ood_names, num_classes=dataset.num_classes))
    if single is None:
        return calibrations, []
    note = (f"TS skipped: class {single} has a single synthetic image, so temperature scaling cannot hold "
            f"{TS_HOLDOUT_FRACTION:.0%} of each class out (MTS fits on all of the set).")
    return tuple(m for m in calibrations if m != "ts"), [note]


def _single_image_class(synset: SyntheticSet, dataset: ImageDataset, specs: list) -> int | None:
    """The first class with a single synthetic image among those the evaluation trains on, or None."""
    from fastdd.trust.temperature import hard_labels

    task = evaluation_task(synset, dataset, holdout_spec(specs))
    counts = torch.bincount(hard_labels(task.targets).cpu())
    single = (counts == 1).nonzero().flatten()
    return int(single[0]) if single.numel() else None


def _set_info(name: str, path: str | None, synset: SyntheticSet) -> dict[str, Any]:
    meta = synset.meta
    hyper = meta.get("hyperparameters") or {}
    if path is not None:
        size = (Path(path) / SYNSET_TENSORS).stat().st_size
        seconds = distillation_seconds(path)
    else:
        from safetensors.torch import save

        size, seconds = len(save(synset.tensors())), None
    return {
        "name": name,
        "path": path,
        "method": meta.get("method"),
        "dataset": meta.get("dataset"),
        "ipc": meta.get("ipc"),
        "images": int(synset.images.shape[0]),
        "outlier_images": 0 if synset.outlier_images is None else int(synset.outlier_images.shape[0]),
        "soft_labels": synset.soft_labels is not None,
        "outliers": hyper.get("outliers") or (meta.get("outliers") or {}).get("mode") or "none",
        "robust": bool(hyper.get("robust", False)),
        "mdt": bool(hyper.get("mdt", False)),
        "mdt_mask_ratio": hyper.get("mask_ratio") if hyper.get("mdt") else None,
        "seed": meta.get("seed"),
        "size_bytes": size,
        "distill_seconds": seconds,
    }
