"""Mixed precision: which dtype convolutions and matmuls run in, everything else staying float32.

``"fp32"`` runs everything in the tensors' own dtype. ``"bf16"`` and ``"fp16"`` run the forward passes under
:func:`torch.autocast`: convolutions and matmuls take bfloat16 / float16 inputs (with float32 accumulation inside
the kernels), while the master copies (synthetic images, learned learning rate, network and student parameters),
the losses, the softmaxes and the optimiser updates stay float32, and so do all gradients with respect to them.
fastdd's own ops take the half-precision activations autocast hands them and accumulate in float32.

bfloat16 keeps float32's exponent range, so no loss scaling is needed. float16 (CUDA only) has a narrow range: the
training loop (:func:`fastdd.training.train_epoch`) scales its losses with a :class:`torch.amp.GradScaler`; the
trajectory-matching unroll scales each student step's loss by a fixed factor (:data:`FP16_STEP_LOSS_SCALE`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("fp32", "bf16", "fp16")

# The half-precision dtypes autocast produces. fastdd's ops (every backend) load them, compute and accumulate in
# float32 (compute_dtype) and store results in the input's dtype.
HALF_DTYPES = (torch.bfloat16, torch.float16)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# A student step's loss is multiplied by this before its parameter gradient is taken in fp16 (and the gradient
# divided by it), so that small activation gradients do not flush to zero; a power of two, so the scaling is exact.
FP16_STEP_LOSS_SCALE = 2.0**10


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ValueError, in one sentence, for an unknown precision or fp16 on a device other than CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise ValueError(
            f"precision fp16 runs on CUDA only (got device {torch.device(device)}); use bf16 on the CPU"
        )


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast gives convolutions and matmuls under ``precision``; None for fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return _AUTOCAST_DTYPES.get(precision)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device | str) -> Iterator[None]:
    """Run the block's forward computations in ``precision`` on ``device`` (a no-op for fp32).

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only).
        device: the device the block computes on (autocast is per device type).
    """
    check_precision(precision, device)
    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


def step_loss_scale(precision: str) -> float:
    """The factor a student step's loss is scaled by before its gradient is taken (1 except for fp16)."""
    return FP16_STEP_LOSS_SCALE if precision == "fp16" else 1.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fastdd computes and accumulates in for inputs of ``dtype``: float32 for bfloat16 and float16,
    ``dtype`` itself otherwise."""
    return torch.float32 if dtype in HALF_DTYPES else dtype


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when autocast made it half precision; float32 and float64 tensors unchanged (a loss on
    logits is then computed in float32 at least)."""
    return t.to(compute_dtype(t.dtype))


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A loss scaler for a training loop in ``precision``: a :class:`torch.amp.GradScaler` for fp16, None otherwise
    (bf16 and fp32 need none)."""
    check_precision(precision, device)
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
