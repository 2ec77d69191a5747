"""Calibration inside the evaluation protocol: raw, temperature-scaled (TS) and masked-temperature-scaled (MTS)
networks trained on a synthetic set, measured on the real test images."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from fastdd.config.evaluate import DEFAULT_CALIBRATION_VAL, CalibrationEvalConfig
from fastdd.errors import FastddError
from fastdd.evaluate.calibration import (
    calibration_metrics,
    save_max_logit_histogram,
    save_reliability_diagram,
)
from fastdd.training import predict_logits
from fastdd.trust.temperature import (
    fit_temperature,
    masked_temperature,
    per_class_holdout,
    usable_temperature,
)

CALIBRATIONS = ("none", "ts", "mts")
# Guo et al.'s TS fits on a held-out split; the 004 paper's TS baseline holds out 10 % of the distilled set.
TS_HOLDOUT_FRACTION = 0.1
# MTS fits T on every synthetic image under this many independent masks: with one mask per image, the temperature of
# a 100-image set swings with the draw (examples/mts_mask_ratio_sweep.py: at r = 0.1 one mask gave T 0.035 and NLL
# 1.55 on digits, ten masks T 0.36 and NLL 0.11).
MTS_MASKS_PER_IMAGE = 10
# --mask-ratio auto chooses among the ratios the calibration authors sweep (DongyaoZhu/mtt-distillation: 0.1..0.9).
AUTO_MASK_RATIOS = tuple(round(0.1 * k, 1) for k in range(1, 10))

# train_subset(indices into S, generator) -> a fresh network trained on those synthetic images
SubsetTrainer = Callable[[torch.Tensor, torch.Generator], torch.nn.Module]


def parse_calibrations(value: list[str] | str) -> tuple[str, ...]:
    """Calibration method names from ``"none,ts,mts"`` or a list of such strings, in the order of ``CALIBRATIONS``.

    Raises:
        FastddError: for an unknown name or an empty choice.
    """
    items = [value] if isinstance(value, str) else list(value)
    names = {part.strip().lower() for item in items for part in item.split(",") if part.strip()}
    unknown = sorted(names - set(CALIBRATIONS))
    if unknown:
        raise FastddError(f"unknown calibration method {unknown[0]!r}; choose from {', '.join(CALIBRATIONS)}.")
    if not names:
        raise FastddError(f"--calibration needs at least one of {', '.join(CALIBRATIONS)}.")
    return tuple(name for name in CALIBRATIONS if name in names)


def check_calibration_methods(targets: torch.Tensor, methods: tuple[str, ...]) -> None:
    """Refuse TS, before any training, when a class of the synthetic targets (``[K]`` labels or ``[K, classes]`` soft
    labels) has a single image: it cannot be both trained on and held out.

    Raises:
        FastddError: naming the class and what to do.
    """
    if "ts" in methods:
        per_class_holdout(targets, TS_HOLDOUT_FRACTION, generator=torch.Generator())


def extra_networks_per_run(methods: tuple[str, ...]) -> int:
    """How many networks the calibration methods train per run besides the run's own (TS trains one)."""
    return 1 if "ts" in methods else 0


@dataclass
class CalibrationTask:
    """The calibration measurements of one evaluation.

    Attributes:
        methods: the chosen ``CALIBRATIONS``.
        images: ``[K, C, H, W]`` the synthetic training images.
        labels: ``[K]`` their hard labels (the argmax of soft labels).
        test_images: ``[M, C, H, W]`` the test images the metrics use (those of the accuracy).
        test_labels: ``[M]`` their labels.
        settings: the calibration options (MTS's mask ratio, filled in, mask unit and fit; the ECE's bins).
        mts_generator: draws MTS's validation masks.
        ts_generator: draws TS's per-class splits and trains the TS networks.
        val_images: ``[V, C, H, W]`` held-out real training images (``--mask-ratio auto``), else None.
        val_labels: ``[V]`` their labels, else None.
    """

    methods: tuple[str, ...]
    images: torch.Tensor
    labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    settings: CalibrationEvalConfig
    mts_generator: torch.Generator
    ts_generator: torch.Generator
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @classmethod
    def create(
        cls, task: Any, methods: tuple[str, ...], *, seed: int, settings: CalibrationEvalConfig,
        train_images: torch.Tensor | None = None, train_labels: torch.Tensor | None = None,
    ) -> "CalibrationTask":
        """For a protocol task (its ``images``, ``targets``, ``test_images``, ``test_labels``), with fresh generators
        derived from ``seed``. With ``--mask-ratio auto`` and MTS, ``train_images`` / ``train_labels`` (the real
        training split, ``[N, C, H, W]`` / ``[N]``) give the held-out images (`calibration_validation_split`; only
        the task's classes). `check_calibration_methods` is the check to make before (TS needs two images per
        class)."""
        targets = task.targets
        labels = targets.argmax(dim=1) if targets.dim() == 2 else targets
        val_images = val_labels = None
        if "mts" in methods and settings.mask_ratio == "auto":
            if train_images is None or train_labels is None:
                raise ValueError("--mask-ratio auto needs the real training images to hold some out")
            count = settings.calibration_val or DEFAULT_CALIBRATION_VAL
            classes = task.shape.num_classes if hasattr(task, "shape") else int(labels.max()) + 1
            val_images, val_labels = calibration_validation_split(
                train_images, train_labels, count, classes=classes, generator=_generator(seed, "validation")
            )
        return cls(
            methods,
            task.images,
            labels,
            task.test_images,
            task.test_labels,
            settings,
            _generator(seed, "mts"),
            _generator(seed, "ts"),
            val_images,
            val_labels,
        )

    def run(
        self, net: torch.nn.Module, test_logits: torch.Tensor, train_subset: SubsetTrainer
    ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """Measure one evaluation run.

        Args:
            net: the run's network, trained on all of S.
            test_logits: ``[M, classes]`` its logits on the test images.
            train_subset: trains a fresh network on a subset of S (for TS).
        Returns:
            ``(rows, scaled)``: ``rows[method]`` = ``{"acc", "ece", "nll", "temperature"}`` (plus ``ece_before`` /
            ``nll_before`` for ``ts``); ``scaled[method]`` = the ``[M, classes]`` test logits divided by the
            method's temperature (for the reliability diagrams), ``scaled["raw"]`` the unscaled ``test_logits`` and
            ``scaled["ts_raw"]`` the TS network's unscaled logits (for the max-logit histogram).
        """
        rows: dict[str, dict[str, float]] = {}
        scaled: dict[str, torch.Tensor] = {"raw": test_logits}
        if "none" in self.methods:
            rows["none"] = {**self._metrics(test_logits), "temperature": 1.0}
            scaled["none"] = test_logits
        if "ts" in self.methods:
            train_idx, val_idx = per_class_holdout(self.labels, TS_HOLDOUT_FRACTION, generator=self.ts_generator)
            ts_net = train_subset(train_idx, self.ts_generator)
            temperature = fit_temperature(predict_logits(ts_net, self.images[val_idx]), self.labels[val_idx])
            ts_logits = predict_logits(ts_net, self.test_images)
            before = self._metrics(ts_logits)
            after = self._metrics(ts_logits, temperature)
            rows["ts"] = {
                **after, "temperature": temperature, "ece_before": before["ece"], "nll_before": before["nll"]
            }
            scaled["ts"] = ts_logits / temperature
            scaled["ts_raw"] = ts_logits
        if "mts" in self.methods:
            chosen: dict[str, float] = {}
            if self.settings.mask_ratio == "auto":
                ratio, temperature, _ = self.choose_mask_ratio(net)
                chosen = {"mask_ratio": ratio}
            else:
                temperature = self._mts_temperature(net, self.settings.mask_ratio)
                if not usable_temperature(temperature):
                    raise FastddError(
                        f"MTS's temperature fit (--mts-fit {self.settings.mts_fit}) ended at T = {temperature:.4g} "
                        f"at --mask-ratio {self.settings.mask_ratio}, which cannot scale logits (the authors' "
                        "optimiser has no line search and overshot); use --mts-fit fastdd, another --mask-ratio, "
                        "or --mask-ratio auto, which skips such ratios."
                    )
            metrics = self._metrics(test_logits, temperature)
            rows["mts"] = {**metrics, "temperature": temperature, **chosen}
            scaled["mts"] = test_logits / temperature
        return rows, scaled

    def _mts_temperature(self, net: torch.nn.Module, ratio: float) -> float:
        return masked_temperature(
            net,
            self.images,
            self.labels,
            ratio=ratio,
            generator=self.mts_generator,
            repeats=MTS_MASKS_PER_IMAGE,
            unit=self.settings.mask_unit,
            fit=self.settings.mts_fit,
        )

    def choose_mask_ratio(self, net: torch.nn.Module) -> tuple[float, float, dict[float, float]]:
        """``--mask-ratio auto``: fit MTS at each of ``AUTO_MASK_RATIOS`` (masks from ``mts_generator``, in that
        order) and keep the ratio whose temperature gives the lowest ECE on the held-out real images; the test
        images are never read here.

        Returns:
            ``(ratio, temperature, validation ECE % by ratio)``; ties go to the smaller ratio. A ratio whose fit
            gives no usable temperature (the authors' fit can overshoot below 0) is skipped: its ECE is NaN.
        Raises:
            FastddError: no ratio gave a usable temperature.
        """
        if self.val_images is None or self.val_labels is None:
            raise ValueError("--mask-ratio auto needs held-out real images (CalibrationTask.create makes them)")
        val_logits = predict_logits(net, self.val_images)
        best: tuple[float, float, float] | None = None
        by_ratio: dict[float, float] = {}
        for ratio in AUTO_MASK_RATIOS:
            temperature = self._mts_temperature(net, ratio)
            if not usable_temperature(temperature):
                by_ratio[ratio] = math.nan
                continue
            ece = calibration_metrics(val_logits, self.val_labels, temperature, n_bins=self.settings.ece_bins)["ece"]
            by_ratio[ratio] = ece
            if best is None or ece < best[0]:
                best = (ece, ratio, temperature)
        if best is None:
            raise FastddError(f"--mask-ratio auto: the temperature fit (--mts-fit {self.settings.mts_fit}) failed at "
                              "every ratio; use --mts-fit fastdd.")
        return best[1], best[2], by_ratio

    def _metrics(self, logits: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
        return calibration_metrics(logits, self.test_labels, temperature, n_bins=self.settings.ece_bins)


def calibration_validation_split(
    images: torch.Tensor, labels: torch.Tensor, count: int, *, classes: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` real training images (and labels) of the classes below ``classes``, drawn uniformly at random
    without replacement (all of them when there are fewer): ``--mask-ratio auto``'s held-out split.

    Args:
        images: ``[N, C, H, W]`` the real training images.
        labels: ``[N]`` their labels.
    """
    pool = torch.nonzero(labels < classes).flatten()
    picked = pool[torch.randperm(len(pool), generator=generator)[:count]]
    return images[picked], labels[picked]


def save_calibration_plots(
    pooled: dict[str, list[torch.Tensor]], test_labels: torch.Tensor, folder: Path, *, model: str, title: str,
    n_bins: int = 15,
) -> list[str]:
    """Write ``calibration_<model>_<method>.png`` (reliability diagram of the runs' pooled, temperature-scaled test
    logits) per method and ``max_logits_<model>.png`` (histogram of the raw networks' max test logits).

    Args:
        pooled: ``scaled`` logits of `CalibrationTask.run` per method, one ``[M, classes]`` tensor per run.
        test_labels: ``[M]`` the test labels.
    Returns:
        The paths written.
    """
    paths = []
    for method, parts in pooled.items():
        if method in ("raw", "ts_raw"):
            continue
        path = folder / f"calibration_{model}_{method}.png"
        labels = test_labels.repeat(len(parts))
        # The runs' predictions pooled into one diagram, so its ECE is the pooled ECE, not the tables' mean of the
        # per-run ECEs; the title says so.
        save_reliability_diagram(torch.cat(parts), labels, path, n_bins=n_bins,
                                 title=f"{title}, {method} ({len(parts)} runs pooled; tables: mean of per-run ECE)")
        paths.append(str(path))
    max_logits = {
        name: torch.cat(pooled[key]).max(dim=1).values
        for key, name in (("raw", "trained on all of S"), ("ts_raw", "TS networks (90 % of S)"))
        if key in pooled
    }
    path = folder / f"max_logits_{model}.png"
    save_max_logit_histogram(max_logits, path, title=title)
    paths.append(str(path))
    return paths


def _generator(seed: int, name: str) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(zlib.crc32(f"{seed}/calibration/{name}".encode()))
    return generator
