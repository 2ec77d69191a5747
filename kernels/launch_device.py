"""The device guard of every Triton launcher: kernels launch on the device of their inputs.

Triton launches on torch's *current* CUDA device. With ``--device cuda:1`` in a process whose current device is
still cuda:0, an unguarded launch would hand device-1 pointers to a device-0 kernel. Each launcher is wrapped in
:func:`on_input_device`, which makes its first argument's device current for the call (nothing to switch for the
CPU tensors of the Triton interpreter).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

Launcher = TypeVar("Launcher", bound=Callable)

_guarded = threading.local()


def guarded_device() -> torch.device | None:
    """The device the innermost running launcher of this thread guards, None outside every launcher (for tests)."""
    return getattr(_guarded, "device", None)


def on_input_device(launcher: Launcher) -> Launcher:
    """``launcher(x, ...)`` runs with ``x.device`` as the current CUDA device (x: its first argument, a tensor)."""

    @functools.wraps(launcher)
    def guarded(x: Tensor, *args, **kwargs):
        outer = guarded_device()
        _guarded.device = x.device
        try:
            if x.device.type != "cuda":
                return launcher(x, *args, **kwargs)
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        finally:
            _guarded.device = outer

    return guarded  # type: ignore[return-value]
