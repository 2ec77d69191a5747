"""Settings for long CPU runs: the heap setting (process-wide from the command line, scoped to fastdd's hot loops
for a library user) and the torch threads that fit the free cores. Nothing here is applied at import."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
import threading
from collections.abc import Iterator

# mallopt parameter numbers from glibc's <malloc.h>, and glibc's defaults of the two settings changed here.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
_DEFAULT_TRIM_THRESHOLD_BYTES = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

OPT_OUT_ENV = "FASTDD_SYSTEM_MALLOC"

_lock = threading.Lock()
_process_wide = False  # keep_freed_memory() applied: the scoped setting has nothing to do
_depth = 0  # kept_heap() blocks currently open, in all threads


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt``, or None on another platform or C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: a different allocator
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def _opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "0") not in ("", "0")


def _keep(mallopt) -> bool:
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


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
    global _process_wide
    mallopt = _glibc_mallopt()
    if _opted_out() or mallopt is None:
        return False
    with _lock:
        _process_wide = _keep(mallopt)
        return _process_wide


@contextlib.contextmanager
def kept_heap() -> Iterator[None]:
    """The heap setting of :func:`keep_freed_memory` for the duration of the block only: fastdd's hot loops
    (``match_gradients``, ``train_epoch``, the distillation and expert jobs) run in it, so a library user gets the
    command line's speed without changing how the rest of the process allocates.

    Re-entrant and shared by threads: the outermost block applies the setting and, when the last open block ends,
    glibc's defaults come back (at most 65536 mmapped chunks, 128 KiB trim threshold), so the next ``free`` returns
    the kept memory to the OS. glibc then keeps its mmap threshold where it was (no longer moved by large frees).
    Does nothing where :func:`keep_freed_memory` is already on (the command line), on a non-glibc platform, or when
    ``FASTDD_SYSTEM_MALLOC`` is set. Usable as a decorator: ``@kept_heap()``.
    """
    global _depth
    mallopt = _glibc_mallopt()
    if _opted_out() or mallopt is None:
        yield
        return
    with _lock:
        if not _process_wide and _depth == 0:
            _keep(mallopt)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if not _process_wide and _depth == 0:
                mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD_BYTES)


def kept_heap_active() -> bool:
    """Whether freed memory is being kept in the heap now (process-wide, or inside a :func:`kept_heap` block)."""
    return _process_wide or _depth > 0


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
