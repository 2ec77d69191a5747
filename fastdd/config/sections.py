"""Config sections shared by several commands: the data, the network, augmentation and the device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastdd.config.options import Section, field_error, field_of, option

DATA, MODEL, AUGMENTATION, PERFORMANCE = "Data", "Model", "Augmentation", "Performance"


def _datasets() -> tuple[str, ...]:
    from fastdd.data import DATASETS

    return DATASETS


def _models() -> tuple[str, ...]:
    from fastdd.models import MODELS

    return MODELS


NORMS = ("instancenorm", "batchnorm", "none")
PRECISIONS = ("fp32", "bf16", "fp16")  # fastdd.precision.PRECISIONS (not imported: it imports torch)


def check_folder_exists(config: Any, name: str) -> None:
    """A folder option that was given must name an existing folder (a typo is never silently ignored)."""
    value = getattr(config, name)
    if value is not None and not Path(value).expanduser().is_dir():
        raise field_error(field_of(config, name), f"is {value!r}, which is not an existing folder")


@dataclass
class DataConfig(Section):
    """Which dataset, read from where, at what size, whitened or not."""

    dataset: str = option("digits", "Dataset name (digits is embedded; the others are read from --data-root or "
                          "their system copies).", panel=DATA, choices=_datasets)
    data_root: str | None = option(None, "Folder holding the dataset files.", panel=DATA,
                                   default_text="the dataset's usual places")
    image_size: int | None = option(None, "Image side for imagefolder datasets.", panel=DATA, at_least=1,
                                    default_text="the images' own (the first training image's shorter side)")
    zca: bool = option(False, "ZCA-whiten the data (kornia, eps 0.1).", panel=DATA, flag="--zca/--no-zca")

    def check_fields(self) -> None:
        check_folder_exists(self, "data_root")


@dataclass
class ModelConfig(Section):
    """The network architecture."""

    model: str = option("convnet", "Network architecture.", panel=MODEL, choices=_models)
    width: int = option(128, "ConvNet width.", panel=MODEL, at_least=1)
    depth: int | None = option(None, "ConvNet depth.", panel=MODEL, at_least=1, default_text="by image size")
    norm: str = option("instancenorm", "Normalisation layer.", panel=MODEL, choices=NORMS)


@dataclass
class AugmentationConfig(Section):
    """Differentiable siamese augmentation (DSA)."""

    dsa: bool = option(True, "Differentiable siamese augmentation.", panel=AUGMENTATION, flag="--dsa/--no-dsa")
    dsa_strategy: str | None = option(None, "DSA families joined by '_'.", panel=AUGMENTATION,
                                      default_text="the dataset's")


@dataclass
class DeviceConfig(Section):
    """Where the tensors live."""

    device: str = option("cpu", "Torch device: cpu, cuda or cuda:N.", panel=PERFORMANCE)
    deterministic: bool = option(
        False, "Bit-identical results on GPU too: torch's deterministic algorithms (and a fixed cuBLAS workspace), "
        "and fastdd's ops avoid their float-atomic GPU kernels; slower on GPU, no effect on CPU (always identical).",
        panel=PERFORMANCE, flag="--deterministic/--no-deterministic", recorded_at_default=False,
    )
    precision: str = option(
        "fp32", "Mixed precision: fp32, bf16 or fp16 (CUDA only). Training and distillation run convolutions and "
        "matmuls in that dtype under autocast; images, parameters, learning rates, losses and gradients stay float32, "
        "and test predictions run in float32.",
        panel=PERFORMANCE, choices=PRECISIONS, recorded_at_default=False,
    )

    def check_fields(self) -> None:
        import torch

        f = field_of(self, "device")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise field_error(f, f"must be a torch device such as cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise field_error(f, f"is {self.device!r} but torch sees no CUDA GPU on this machine; use --device cpu")
            if device.index is not None and device.index >= count:
                raise field_error(f, f"is {self.device!r} but this machine has {count} CUDA GPU(s) (cuda:0 to "
                                     f"cuda:{count - 1})")
        if self.precision == "fp16" and device.type != "cuda":
            raise field_error(
                field_of(self, "precision"), f"is fp16, which runs on CUDA only (the device is {self.device!r}); use bf16"
            )
