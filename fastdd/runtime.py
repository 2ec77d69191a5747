"""Process-wide settings for long CPU runs, applied by the command line (never at library import)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int

OPT_OUT_ENV = "FASTDD_SYSTEM_MALLOC"


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the heap for reuse instead of returning it to the OS at every free.

    By default glibc serves every allocation above its mmap threshold (at most 32 MiB; one 100x128x32x32 float32
    activation is 50 MiB) with fresh pages and unmaps them on free, so a loop that allocates and frees such tensors
    pays the kernel to zero-fill them again each time: up to a third of a trajectory-matching iteration on CPU. This
    routes every allocation through the heap and keeps its free part, so the resident set stays at its high-water
    mark for the life of the process.

    Returns:
        True when the settings were applied; False on a non-glibc platform or when the environment variable
        ``FASTDD_SYSTEM_MALLOC`` is set to a non-empty value other than ``0``.
    """
    if os.environ.get(OPT_OUT_ENV, "0") not in ("", "0"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: a different allocator
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
