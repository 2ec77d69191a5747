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


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat; None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_busy_elsewhere(seconds: float = 0.25) -> float:
    """How many of this machine's cores other processes kept busy over the next ``seconds`` (this process is idle
    meanwhile); 0 where it cannot be measured."""
    import time

    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    return (after[0] - before[0]) / (after[1] - before[1]) * (os.cpu_count() or 1)


def threads_for_free_cores() -> tuple[int, int] | None:
    """``(threads, cores)`` when other work keeps some of the cores this process may use busy: one torch thread per
    free core (at least one), since a thread that waits for a descheduled peer slows every step; None when all are
    free, or when ``OMP_NUM_THREADS`` already chose."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = round(cores_busy_elsewhere() * cores / (os.cpu_count() or cores))
    if busy <= 0 or cores <= 1:
        return None
    return max(1, cores - busy), cores
