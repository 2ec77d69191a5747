"""Benchmark of the trajectory-matching gradient: fastdd's exact constant-memory `tesla` against the full unroll.

    python benchmarks/trajectory.py [--steps 10 20 40 --repeats 3 --images 100 --width 128 --augment --json FILE]
    python benchmarks/trajectory.py --quick        # a tiny configuration, a smoke run in seconds

One MTT step on CIFAR-10-sized synthetic data: a ConvNet-3 (instancenorm) student starts at an init snapshot and
takes ``syn_steps`` SGD steps on all ``--images`` synthetic 3x32x32 images (10 per class); the target is the start
plus small noise. ``fastdd.distill.trajectory.match_gradients`` is timed in its three modes: ``unrolled`` (autograd
through the unroll, MTT's reference semantics), ``exact`` (fastdd's ``tesla``: the same gradient by reverse
accumulation) and ``compat`` (TESLA's published stop-gradient gradient).

Each (mode, syn_steps) runs in a fresh process. Time is the median wall time of ``--repeats`` calls after one
warm-up, with the process's CPU time, its kernel part and the page faults beside it: on a shared machine the wall
time follows the other processes (``--threads 1`` makes CPU time a steadier measure), and on Linux a large share of
the time can be the kernel zero-filling the pages glibc unmapped at the previous free. The children apply the
``fastdd`` command line's heap setting (``fastdd.runtime.keep_freed_memory``: freed memory stays in the heap for
reuse); ``--heap library`` measures a plain ``import fastdd`` process instead (fastdd's calls keep freed memory only
while they run, ``fastdd.runtime.kept_heap``), ``--heap system`` glibc's defaults throughout. Peak memory, on CPU, is measured twice, one more
call each: the resident peak is how far the call raises the process's resident set (VmHWM after the call, reset
through /proc/self/clear_refs, minus VmRSS before it, free heap returned to the OS first): everything the process
touches, heap fragmentation included, which is what decides whether a run fits in RAM (with glibc's defaults it
misses short-lived peaks, since unmapped memory leaves the count). The tensor peak is the torch profiler's running
sum of tensor allocations: what the algorithm itself holds (``--no-allocator-peak`` skips it). On CUDA the peak is
``torch.cuda.max_memory_allocated``.

The targets printed at the end are information, not an exit code: ``exact`` peak memory at the most vs the fewest
steps (40 vs 10 by default) <= 1.15x, and at the middle step count (20) ``exact``/``unrolled`` peak memory <= 0.3x
and time <= 1.2x, the memory targets for both peaks. The gradient columns compare each mode's image gradient with
``unrolled``'s from the same draws. ``--modes reference-mtt`` adds the same unroll written the way the MTT reference
code does it (``benchmarks/reference_mtt.py``: unfused modules and augmentation), the baseline of ``throughput.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import resource
import statistics
import sys
import traceback
from dataclasses import asdict, dataclass

import torch
from common import (
    call_costs,
    cpu_counts,
    describe_machine,
    load_average,
    peak_memory_bytes,
    peak_rss_increase,
)

from reference_mtt import reference_mtt_gradients

from fastdd.distill.trajectory import MODES, match_gradients
from fastdd.models import build_model, flat_parameters
from fastdd.runtime import OPT_OUT_ENV, keep_freed_memory

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
CLASSES = 10
TARGET_NOISE = 1e-3  # std of the gaussian step from the start snapshot to the target snapshot

# The MTT reference code's way of doing an unrolled step (benchmarks/reference_mtt.py), measured like a mode.
REFERENCE_MTT = "reference-mtt"

HEAPS = {
    "cli": "freed memory kept in the heap, process-wide (fastdd.runtime.keep_freed_memory, as the CLI)",
    "library": "a plain import: freed memory kept only during fastdd's calls (fastdd.runtime.kept_heap)",
    "system": "glibc defaults (FASTDD_SYSTEM_MALLOC=1)",
}

MEMORY_FLAT_TARGET = 1.15  # exact peak at the most steps / at the fewest
MEMORY_RATIO_TARGET = 0.3  # exact / unrolled peak at the middle step count
TIME_RATIO_TARGET = 1.2  # exact / unrolled time at the middle step count


@dataclass(frozen=True)
class Config:
    """One problem: everything a child process needs to rebuild it identically."""

    images: int
    width: int
    image_size: int
    syn_lr: float
    augment: str | None
    repeats: int
    dtype: str
    device: str
    allocator_peak: bool
    threads: int | None = None
    heap: str = "cli"  # "cli": keep_freed_memory() process-wide; "library": nothing (kept_heap scopes); "system"
    seed: int = 0
    keep_graphs: int = 1  # exact/compat: final student steps whose graphs the forward sweep keeps
    precision: str = "fp32"  # match_gradients' autocast precision (fastdd.precision); the reference runs in dtype


def _problem(config: Config):
    """The net, images [n, 3, s, s], class-major labels [n] and start/target snapshots [P], all from one seed."""
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    generator = torch.Generator().manual_seed(config.seed)
    net = build_model(
        "convnet", channels=3, num_classes=CLASSES, image_size=config.image_size, width=config.width,
        norm="instancenorm", generator=generator,
    )
    start = flat_parameters(net).detach().clone()
    target = start + TARGET_NOISE * torch.randn(start.shape, generator=generator)
    images = torch.randn(config.images, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.arange(CLASSES).repeat_interleave(config.images // CLASSES)
    net = net.to(device, dtype)
    return net, images.to(device, dtype), labels.to(device), start.to(device, dtype), target.to(device, dtype)


def _measure(config: Config, mode: str, steps: int) -> dict:
    """Time and peak memory of ``match_gradients`` in one mode, in this (fresh) process."""
    device = torch.device(config.device)
    if config.heap == "cli":
        keep_freed_memory()
    elif config.heap == "system":
        os.environ[OPT_OUT_ENV] = "1"  # fastdd's scoped setting stands aside too
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    net, images, labels, start, target = _problem(config)

    def call():
        # The same draws every call, so every call (and every mode) does the same work.
        generator = torch.Generator().manual_seed(config.seed + 1)
        if mode == REFERENCE_MTT:
            return reference_mtt_gradients(
                net, images, labels, start, target, config.syn_lr, syn_steps=steps, augment=config.augment,
                generator=generator,
            )
        return match_gradients(
            net, images, labels, start, target, config.syn_lr, syn_steps=steps, mode=mode,
            augment=config.augment, generator=generator, keep_graphs=1 if mode == "unrolled" else config.keep_graphs,
            precision=config.precision,
        )

    loss, grad_images, grad_lr = call()
    costs = call_costs(call, device, repeats=config.repeats, warmup=0)
    page = resource.getpagesize()
    result = {
        "mode": mode,
        "steps": steps,
        "seconds": [cost.wall for cost in costs],
        "median_seconds": statistics.median(cost.wall for cost in costs),
        "median_cpu_seconds": statistics.median(cost.cpu for cost in costs),
        "median_system_seconds": statistics.median(cost.system for cost in costs),
        "median_fault_bytes": statistics.median(cost.minor_faults * page for cost in costs),
    }
    if device.type == "cuda":
        result.update(peak_bytes=peak_memory_bytes(call, device), baseline_bytes=torch.cuda.memory_allocated(device))
        result["peak_source"] = "torch.cuda.max_memory_allocated"
    else:
        rss = peak_rss_increase(call)
        result.update(peak_bytes=rss.increase, baseline_bytes=rss.baseline)
        result["peak_source"] = "VmHWM - VmRSS" + ("" if rss.reset else " (high-water mark not resettable)")
    if config.allocator_peak and device.type == "cpu":
        result["allocator_peak_bytes"] = peak_memory_bytes(call, device)
    result.update(
        loss=float(loss),
        grad_lr=float(grad_lr),
        grad_images=grad_images.detach().cpu().double().numpy(),
        torch_threads=torch.get_num_threads(),
        load_average=load_average(),
    )
    return result


def _child(config: Config, mode: str, steps: int, connection) -> None:
    try:
        connection.send(_measure(config, mode, steps))
    except BaseException:
        connection.send({"mode": mode, "steps": steps, "error": traceback.format_exc()})
    finally:
        connection.close()


def measure_in_fresh_process(config: Config, mode: str, steps: int) -> dict:
    """``_measure`` in a spawned child, so its peak memory is its own; a crash (e.g. the OOM killer) is reported."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(config, mode, steps, sender))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if result is None:
        result = {"mode": mode, "steps": steps, "error": f"the child process died with exit code {process.exitcode}"}
    return result


def _relative_error(a, b) -> float:
    import numpy as np

    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _cosine(a, b) -> float:
    import numpy as np

    return float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def targets(rows: dict[tuple[str, int], dict], steps: list[int]) -> list[dict]:
    """The issue's three targets, at the fewest/most/middle step counts measured (10/40/20 by default)."""
    fewest, most = min(steps), max(steps)
    middle = 20 if 20 in steps else sorted(steps)[len(steps) // 2]

    def get(mode, n, key):
        row = rows.get((mode, n), {})
        return None if "error" in row else row.get(key)

    checks = [
        (f"exact / unrolled resident peak at {middle} steps", get("exact", middle, "peak_bytes"),
         get("unrolled", middle, "peak_bytes"), MEMORY_RATIO_TARGET),
        (f"exact / unrolled tensor peak at {middle} steps", get("exact", middle, "allocator_peak_bytes"),
         get("unrolled", middle, "allocator_peak_bytes"), MEMORY_RATIO_TARGET),
        (f"exact / unrolled time at {middle} steps", get("exact", middle, "median_seconds"),
         get("unrolled", middle, "median_seconds"), TIME_RATIO_TARGET),
        ("  same, in process CPU time", get("exact", middle, "median_cpu_seconds"),
         get("unrolled", middle, "median_cpu_seconds"), TIME_RATIO_TARGET),
    ]
    if fewest != most:
        checks[:0] = [
            (f"exact resident peak, {most} vs {fewest} steps", get("exact", most, "peak_bytes"),
             get("exact", fewest, "peak_bytes"), MEMORY_FLAT_TARGET),
            (f"exact tensor peak, {most} vs {fewest} steps", get("exact", most, "allocator_peak_bytes"),
             get("exact", fewest, "allocator_peak_bytes"), MEMORY_FLAT_TARGET),
        ]
    out = []
    for name, numerator, denominator, limit in checks:
        ratio = _ratio(numerator, denominator)
        verdict = "n/a" if ratio is None else ("PASS" if ratio <= limit else "MISS")
        out.append({"target": name, "ratio": ratio, "limit": limit, "verdict": verdict})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="syn_steps values (default 10 20 40)")
    parser.add_argument("--modes", nargs="+", choices=(*MODES, REFERENCE_MTT), default=["unrolled", "exact", "compat"])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3)")
    parser.add_argument("--images", type=int, default=None, help="synthetic images, a multiple of 10 (default 100)")
    parser.add_argument("--width", type=int, default=None, help="ConvNet channels (default 128)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--syn-lr", type=float, default=0.01)
    parser.add_argument("--augment", action="store_true", help=f"DSA augmentation ({DSA_STRATEGY}) at every step")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads in the children (default: torch's); 1 makes CPU time robust to other processes",
    )
    parser.add_argument(
        "--allocator-peak", action=argparse.BooleanOptionalAction, default=True,
        help="also the torch profiler's tensor-byte peak (one more, slower call per row; default on)",
    )
    parser.add_argument(
        "--heap", choices=HEAPS, default="cli",
        help="the children's heap: cli (freed memory kept for reuse, process-wide, as the fastdd command line does; "
        "the default), library (a plain import: fastdd keeps it only during its calls), system (glibc's defaults)",
    )
    parser.add_argument("--quick", action="store_true", help="20 images, width 16, steps 2 4 8, 1 repeat")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()

    quick = {"steps": [2, 4, 8], "repeats": 1, "images": 20, "width": 16}
    full = {"steps": [10, 20, 40], "repeats": 3, "images": 100, "width": 128}
    for key, default in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.images % CLASSES or args.images <= 0:
        parser.error(f"--images must be a positive multiple of {CLASSES} (class-major labels), got {args.images}")
    steps = sorted(set(args.steps))
    config = Config(
        images=args.images, width=args.width, image_size=args.image_size, syn_lr=args.syn_lr,
        augment=DSA_STRATEGY if args.augment else None, repeats=args.repeats, dtype=args.dtype, device=args.device,
        allocator_peak=args.allocator_peak, threads=args.threads, heap=args.heap,
    )
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # only so that the machine line below reports the children's count
    malloc = HEAPS[args.heap]
    modes = ["unrolled"] + [m for m in args.modes if m != "unrolled"] if "unrolled" in args.modes else args.modes

    started = datetime.datetime.now().astimezone()
    physical, threads = cpu_counts()
    print(
        f"match_gradients: ConvNet-3 width {args.width} instancenorm, {args.images} synthetic images "
        f"3x{args.image_size}x{args.image_size} {args.dtype} ({args.images // CLASSES} per class), batch_syn all, "
        f"{'DSA ' + DSA_STRATEGY if args.augment else 'no augmentation'}, syn_lr {args.syn_lr}, {device}"
    )
    print(f"machine: {describe_machine(device)}")
    print(f"{physical or '?'} physical cores, {threads} hardware threads; started {started:%Y-%m-%d %H:%M:%S %Z}")
    peak_source = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "resident-set growth (VmHWM - VmRSS)"
    print(
        f"each (mode, steps) in a fresh process: time = median of {args.repeats} calls after 1 warm-up; "
        f"peak = {peak_source} during one more call; {malloc}"
    )
    print(flush=True)

    rows: dict[tuple[str, int], dict] = {}
    for n in steps:
        for mode in modes:
            print(f"  measuring {mode} at {n} steps ...", file=sys.stderr, flush=True)
            rows[(mode, n)] = measure_in_fresh_process(config, mode, n)

    alloc = args.allocator_peak and device.type == "cpu"
    header = (
        f"{'mode':<14}{'steps':>6}{'wall s':>9}{'min-max':>13}{'x unr':>8}{'cpu s':>8}{'x unr':>8}{'sys s':>7}"
        f"{'faults':>9}{'peak MiB':>10}{'x unr':>8}{'setup':>7}" + (f"{'tensor':>8}" if alloc else "")
        + f"{'grad err':>10}{'cosine':>8}{'load':>6}"
    )
    print(header)
    print("-" * len(header))
    for (mode, n), row in rows.items():
        name = "exact (tesla)" if mode == "exact" else mode
        if "error" in row:
            print(f"{name:<14}{n:>6}  FAILED: {row['error'].strip().splitlines()[-1]}")
            continue
        reference = rows.get(("unrolled", n), {})
        ok = "error" not in reference and reference
        time_ratio = _ratio(row["median_seconds"], reference.get("median_seconds")) if ok else None
        cpu_ratio = _ratio(row["median_cpu_seconds"], reference.get("median_cpu_seconds")) if ok else None
        memory_ratio = _ratio(row["peak_bytes"], reference.get("peak_bytes")) if ok else None
        rel_err = _relative_error(row["grad_images"], reference["grad_images"]) if ok else None
        cosine = _cosine(row["grad_images"], reference["grad_images"]) if ok else None
        row.update(
            time_ratio=time_ratio, cpu_ratio=cpu_ratio, memory_ratio=memory_ratio, grad_rel_err=rel_err,
            grad_cosine=cosine,
        )
        spread = f"{min(row['seconds']):.1f}-{max(row['seconds']):.1f}"
        print(
            f"{name:<14}{n:>6}{row['median_seconds']:>9.2f}{spread:>13}{_fmt(time_ratio, '.2f', 'x'):>8}"
            f"{row['median_cpu_seconds']:>8.1f}{_fmt(cpu_ratio, '.2f', 'x'):>8}{row['median_system_seconds']:>7.1f}"
            f"{row['median_fault_bytes'] / 2**30:>6.1f}GiB{row['peak_bytes'] / 2**20:>10.0f}"
            f"{_fmt(memory_ratio, '.3f', 'x'):>8}{row['baseline_bytes'] / 2**20:>7.0f}"
            + (f"{row.get('allocator_peak_bytes', 0) / 2**20:>8.0f}" if alloc else "")
            + f"{_fmt(rel_err, '.1e'):>10}{_fmt(cosine, '.4f'):>8}{_fmt(row['load_average'], '.1f'):>6}"
        )
    print(
        "wall s / cpu s: medians per call (cpu = all threads, user + system); sys s: kernel part; faults: fresh "
        "pages mapped per call;\npeak, setup (resident set after setup) and tensor (profiler) in MiB; grad err / "
        "cosine: image gradient vs unrolled's from the same draws"
    )
    print()
    print("targets (information, not an exit code):")
    checks = targets(rows, steps)
    for check in checks:
        print(f"  {check['target']:<44}{_fmt(check['ratio'], '.3f', 'x'):>9}  (target <= {check['limit']}x)  "
              f"{check['verdict']}")
    finished = datetime.datetime.now().astimezone()
    print(f"finished {finished:%Y-%m-%d %H:%M:%S %Z} ({(finished - started).total_seconds() / 60:.1f} min), "
          f"load average {_fmt(load_average(), '.1f')}")

    if args.json:
        serialisable = [{k: v for k, v in row.items() if k != "grad_images"} for row in rows.values()]
        report = {
            "config": asdict(config),
            "steps": steps,
            "machine": describe_machine(device),
            "physical_cores": physical,
            "hardware_threads": threads,
            "started": started.isoformat(),
            "finished": finished.isoformat(),
            "rows": serialisable,
            "targets": checks,
        }
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
