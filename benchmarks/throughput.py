"""fastdd's speed in one run: every compiled op against its reference, a tesla iteration against the reference MTT
unroll, the share of the machine's fp32 GEMM peak that a tesla iteration reaches, and batched students.

    python benchmarks/throughput.py [--repeats 5] [--steps 20] [--threads N] [--json FILE]
    python benchmarks/throughput.py --quick      # tiny sizes: checks that every section runs, in about a minute

Sections (medians of ``--repeats`` timed calls after a warm-up; speedup = reference time / fastdd time):

1. Ops: each op's ``cpp`` backend against its pure-PyTorch reference, forward and forward+backward (and, for the
   fused ConvNet epilogue, the double backward trajectory matching needs), at the sizes of a CIFAR-10 IPC 10 run.
2. Trajectory matching, ConvNet-3 (instancenorm, width 128), 100 synthetic images 3x32x32, ``--steps`` student
   steps on all images, DSA at every step: fastdd's ``tesla`` (``exact``; again keeping the last ``--keep-graphs``
   steps' graphs; again with ``--precision bf16``: autocast convolutions and matmuls, float32 master copies) and
   ``unrolled`` modes against the same float32 work written the way the MTT reference code does it
   (``benchmarks/reference_mtt.py``: the whole unroll in the autograd graph, unfused modules and augmentation).
   Each in a fresh process: time, resident peak, and the cosine of the image gradient with the reference's (all
   compute the same gradient). The children set the command line's heap (``fastdd.runtime.keep_freed_memory``);
   ``tesla`` runs twice more: in a plain-import process (fastdd keeps freed memory only during its own calls) and
   with glibc's defaults, which shows what the setting is worth.
3. Hardware use: the fp32 FLOPs of one tesla iteration (convolutions and matmuls, counted by
   ``torch.utils.flop_counter``) divided by its time, against this machine's fp32 GEMM peak measured here (the
   fastest call of a 2048^3 ``torch.mm`` and of a 128-channel 3x3 convolution).
4. Batched students: S = 4 students run as one grouped network (``fastdd.models.batched``) against 4 students run
   one after another: student steps per second for the first-order step (tesla's forward sweep) and for the
   reverse-accumulation step (gradient with its graph, then the Hessian-vector and image terms), and the ceiling of
   any batching: both do the same FLOPs, so batching cannot beat the GEMM peak over the sequential students' rate.
   Then a whole tesla iteration of 4 students (20 images 1x28x28, 10 steps, DSA) sequential and grouped, as
   ``--student-batching`` runs it (``benchmarks/batched_students.py``).

Targets on a 2-core CPU are printed with PASS/MISS; they are information, not an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys

import torch
import torch.nn.functional as F
from batched_students import batched_iteration_row
from common import describe_machine, load_average, median_seconds, wall_times
from ops_augment import augment_rows
from ops_cvar import cvar_rows, robust_loss_rows
from ops_norm_relu_pool import norm_relu_pool_rows
from trajectory import DSA_STRATEGY, REFERENCE_MTT, Config, _cosine, _problem, measure_in_fresh_process

from fastdd.distill.trajectory import match_gradients
from fastdd.models import build_model, flat_parameters
from fastdd.models.batched import batched_functional_forward
from fastdd.models.functional import functional_forward
from fastdd.runtime import keep_freed_memory

AUGMENT_TARGET = 3.0  # diff_augment fwd+bwd, batch 256 of 3x32x32, both modes
ROBUST_LOSS_TARGET = 10.0  # nearest_synthetic + group_cvar_loss vs cdist + per-cluster sort
TESLA_TIME_TARGET = 0.5  # tesla / reference MTT unroll, time
TESLA_MEMORY_TARGET = 0.3  # tesla / reference MTT unroll, resident peak
TESLA_BF16_TIME_TARGET = 0.45  # tesla --precision bf16 / the float32 reference MTT unroll, time (memory: as above)
BATCHED_TARGET = 1.5  # batched / sequential student steps per second, 4 students
STUDENTS = 4
# The second tesla row keeps the last 12 of the 20 student steps' graphs from the forward sweep: about 0.16 GiB per
# kept step here, which keeps its resident peak near 0.26x the reference's, under the 0.3x memory target.
KEPT_GRAPHS = 12
KEPT = "exact-kept"
BF16 = "exact-bf16"
BF16_KEPT = "exact-bf16-kept"


def _verdict(value: float | None, limit: float, higher_is_better: bool) -> str:
    if value is None:
        return "n/a"
    return "PASS" if (value >= limit if higher_is_better else value <= limit) else "MISS"


def _split(op: str, case: str, row: dict, target: float | None = None, forward_target: float | None = None):
    """Forward and forward+backward rows from one ``common.speedup_row``, each with its target (None: no target)."""
    return [
        {"op": op, "case": f"{case} forward", "reference_ms": row["reference_forward_ms"],
         "fastdd_ms": row["fastdd_forward_ms"], "speedup": row["forward_speedup"], "target": forward_target},
        {"op": op, "case": f"{case} fwd+bwd", "reference_ms": row["reference_fwd_bwd_ms"],
         "fastdd_ms": row["fastdd_fwd_bwd_ms"], "speedup": row["fwd_bwd_speedup"], "target": target},
    ]


def op_rows(repeats: int, device: torch.device, quick: bool) -> list[dict]:
    """Rows of every op benchmark: op, case, reference_ms, fastdd_ms, speedup, target (None where none is set)."""
    rows = []
    for row in augment_rows(repeats, device, batch=8 if quick else 256, size=8 if quick else 32):
        if row["name"].startswith(("S average", "M ")):
            rows += _split("diff_augment", row["name"], row, AUGMENT_TARGET)

    real_per_class, dims = (16, 48) if quick else (256, 3072)
    for row in robust_loss_rows(repeats, device, real_per_class=real_per_class, d=dims):
        rows += _split("nearest+group_cvar_loss", f"10x{real_per_class} real, IPC 10, D={dims}", row,
                       ROBUST_LOSS_TARGET, ROBUST_LOSS_TARGET)
    for row in cvar_rows(repeats, device, n=160 if quick else 2560):
        rows += _split("cluster_cvar", row["name"].removeprefix("cluster_cvar "), row)
    for row in norm_relu_pool_rows(repeats, device, batch=4 if quick else 100, width=8 if quick else 128):
        rows.append({**row, "target": None})
    return rows


def matmul_peak_gflops(repeats: int, size: int = 2048) -> float:
    """This machine's fp32 GEMM throughput with the current torch threads: the fastest call of two GEMM-class kernels,
    a square ``torch.mm`` (BLAS) and a 128-channel 3x3 convolution (oneDNN's implicit GEMM, which on some CPUs beats
    the BLAS ``mm``). A peak, so the best call, not the median."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    x, w = torch.randn(100, 128, 16, 16), torch.randn(128, 128, 3, 3)
    calls = max(5, 2 * repeats)
    cpu = torch.device("cpu")
    mm = 2 * size**3 / min(wall_times(lambda: torch.mm(a, b), cpu, repeats=calls))
    conv = 2 * 100 * 128 * 128 * 9 * 16 * 16 / min(wall_times(lambda: F.conv2d(x, w, padding=1), cpu, repeats=calls))
    return max(mm, conv) / 1e9


def tesla_flops(config: Config, steps: int) -> int:
    """Convolution and matmul FLOPs of one ``exact`` (tesla) call on the benchmark problem, with
    ``config.keep_graphs`` kept graphs."""
    from torch.utils.flop_counter import FlopCounterMode

    net, images, labels, start, target = _problem(config)
    counter = FlopCounterMode(display=False)
    with counter:
        match_gradients(
            net, images, labels, start, target, config.syn_lr, syn_steps=steps, mode="exact",
            augment=config.augment, generator=torch.Generator().manual_seed(config.seed + 1),
            keep_graphs=config.keep_graphs,
        )
    return counter.get_total_flops()


def batched_student_rows(repeats: int, batch: int, width: int, image_size: int) -> list[dict]:
    """Student steps per second of S students run one after another and as one batched network."""
    generator = torch.Generator().manual_seed(0)
    net = build_model("convnet", channels=3, num_classes=10, image_size=image_size, width=width, generator=generator)
    base = flat_parameters(net).detach()
    thetas = torch.stack([base + 0.01 * torch.randn(base.shape, generator=generator) for _ in range(STUDENTS)])
    images = torch.randn(STUDENTS, batch, 3, image_size, image_size, generator=generator)
    labels = torch.randint(0, 10, (STUDENTS, batch), generator=generator)
    directions = 1e-3 * torch.randn(thetas.shape, generator=generator)

    def sequential_logits(theta, x):
        return torch.stack([functional_forward(net, theta[s], x[s]) for s in range(STUDENTS)])

    def first_order(logits_fn):
        def step():
            theta = thetas.clone().requires_grad_(True)
            loss = F.cross_entropy(logits_fn(theta, images).flatten(0, 1), labels.flatten(), reduction="sum")
            torch.autograd.grad(loss, theta)
        return step

    def reverse(logits_fn):
        def step():
            theta = thetas.clone().requires_grad_(True)
            x = images.clone().requires_grad_(True)
            loss = F.cross_entropy(logits_fn(theta, x).flatten(0, 1), labels.flatten(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, theta, create_graph=True)
            torch.autograd.grad((grad * directions).sum(), (x, theta))
        return step

    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name, make in (("first-order step", first_order), ("reverse step", reverse)):
        sequential = median_seconds(make(sequential_logits), torch.device("cpu"), repeats=repeats)
        batched = median_seconds(make(lambda t, x: batched_functional_forward(net, t, x)), torch.device("cpu"),
                                 repeats=repeats)
        counter = FlopCounterMode(display=False)
        with counter:
            make(sequential_logits)()
        rows.append({
            "step": name, "batch": batch, "students": STUDENTS,
            "sequential_steps_per_s": STUDENTS / sequential, "batched_steps_per_s": STUDENTS / batched,
            "speedup": sequential / batched, "sequential_gflops_per_s": counter.get_total_flops() / sequential / 1e9,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per op measurement (default 5)")
    parser.add_argument("--trajectory-repeats", type=int, default=3, help="timed calls per trajectory mode")
    parser.add_argument("--steps", type=int, default=20, help="student steps of the trajectory comparison")
    parser.add_argument("--keep-graphs", type=int, default=KEPT_GRAPHS,
                        help=f"kept graphs of the second tesla row (default {KEPT_GRAPHS}; 1 skips that row)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-trajectory", action="store_true", help="only the op and batched-student sections")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    keep_freed_memory()  # as the fastdd command line does; the trajectory children apply it themselves
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    repeats = 1 if args.quick else args.repeats
    started = datetime.datetime.now().astimezone()
    report: dict = {"machine": describe_machine(device), "started": started.isoformat(), "quick": args.quick}
    print(f"machine: {report['machine']}")
    print(f"started {started:%Y-%m-%d %H:%M:%S %Z}; medians of {repeats} timed calls after a warm-up\n", flush=True)

    print("1. ops: cpp backend vs pure-PyTorch reference")
    rows = op_rows(repeats, device, args.quick)
    header = f"{'op':<24}{'case':<36}{'reference ms':>13}{'fastdd ms':>11}{'speedup':>9}{'target':>14}"
    print(header)
    print("-" * len(header))
    for row in rows:
        target = row["target"]
        verdict = f">={target:g}x {_verdict(row['speedup'], target, True)}" if target else ""
        print(f"{row['op']:<24}{row['case']:<36}{row['reference_ms']:>13.2f}{row['fastdd_ms']:>11.2f}"
              f"{row['speedup']:>8.1f}x{verdict:>14}")
    report["ops"] = rows
    print(flush=True)

    config = Config(
        images=20 if args.quick else 100, width=8 if args.quick else 128, image_size=32, syn_lr=0.01,
        augment=DSA_STRATEGY, repeats=1 if args.quick else args.trajectory_repeats, dtype="float32", device="cpu",
        allocator_peak=False, threads=args.threads,
    )
    steps = 3 if args.quick else args.steps
    if not args.skip_trajectory:
        print(f"2. trajectory matching: ConvNet-3 width {config.width}, {config.images} images 3x32x32, {steps} "
              f"steps, DSA, each mode in a fresh process")
        results = {}
        for mode in (REFERENCE_MTT, "unrolled", "exact"):
            print(f"  measuring {mode} ...", file=sys.stderr, flush=True)
            results[mode] = measure_in_fresh_process(config, mode, steps)
        kept = min(args.keep_graphs, steps)
        if kept > 1:
            print(f"  measuring exact with {kept} kept graphs ...", file=sys.stderr, flush=True)
            results[KEPT] = measure_in_fresh_process(dataclasses.replace(config, keep_graphs=kept), "exact", steps)
        print("  measuring exact in bf16 ...", file=sys.stderr, flush=True)
        results[BF16] = measure_in_fresh_process(dataclasses.replace(config, precision="bf16"), "exact", steps)
        if kept > 1:
            print(f"  measuring exact in bf16 with {kept} kept graphs ...", file=sys.stderr, flush=True)
            results[BF16_KEPT] = measure_in_fresh_process(
                dataclasses.replace(config, precision="bf16", keep_graphs=kept), "exact", steps
            )
        for heap in ("library", "system"):
            print(f"  measuring exact with the {heap} heap ...", file=sys.stderr, flush=True)
            results[f"exact-{heap}"] = measure_in_fresh_process(dataclasses.replace(config, heap=heap), "exact", steps)
        reference = results[REFERENCE_MTT]
        header = f"{'implementation':<34}{'wall s':>8}{'x ref':>8}{'peak MiB':>10}{'x ref':>8}{'cosine':>8}{'load':>6}"
        print(header)
        print("-" * len(header))
        names = {REFERENCE_MTT: "reference MTT unroll", "unrolled": "fastdd unrolled", "exact": "fastdd tesla (exact)",
                 KEPT: f"fastdd tesla, --keep-graphs {kept}", BF16: "fastdd tesla, --precision bf16",
                 BF16_KEPT: f"fastdd tesla, bf16, --keep-graphs {kept}",
                 "exact-library": "fastdd tesla, plain import", "exact-system": "fastdd tesla, glibc heap defaults"}
        for mode, row in results.items():
            if "error" in row or "error" in reference:
                print(f"{names[mode]:<34}FAILED: {(row.get('error') or reference['error']).strip().splitlines()[-1]}")
                continue
            row["time_ratio"] = row["median_seconds"] / reference["median_seconds"]
            row["memory_ratio"] = row["peak_bytes"] / reference["peak_bytes"]
            row["grad_cosine"] = _cosine(row["grad_images"], reference["grad_images"])
            print(f"{names[mode]:<34}{row['median_seconds']:>8.2f}{row['time_ratio']:>7.2f}x"
                  f"{row['peak_bytes'] / 2**20:>10.0f}{row['memory_ratio']:>7.3f}x{row['grad_cosine']:>8.4f}"
                  f"{row['load_average']:>6.1f}")
        for mode in ("exact", KEPT, BF16, BF16_KEPT):
            row = results.get(mode, {})
            if "time_ratio" in row:
                label = {"exact": "tesla", KEPT: f"tesla --keep-graphs {kept}", BF16: "tesla --precision bf16",
                         BF16_KEPT: f"tesla bf16 --keep-graphs {kept}"}[mode]
                limit = TESLA_BF16_TIME_TARGET if mode in (BF16, BF16_KEPT) else TESLA_TIME_TARGET
                print(f"  {label} / reference time  {row['time_ratio']:.2f}x  (target <= {limit}x)  "
                      f"{_verdict(row['time_ratio'], limit, False)}")
                print(f"  {label} / reference peak  {row['memory_ratio']:.3f}x  (target <= {TESLA_MEMORY_TARGET}x)  "
                      f"{_verdict(row['memory_ratio'], TESLA_MEMORY_TARGET, False)}")
        cli, library = results["exact"], results["exact-library"]
        if "median_seconds" in cli and "median_seconds" in library:
            print(f"  library / command line time  {library['median_seconds'] / cli['median_seconds']:.2f}x  "
                  f"(match_gradients from a plain import, where fastdd keeps freed memory only during its calls, "
                  f"against the CLI's process-wide setting; target ~1x)")
        report["trajectory"] = {
            mode: {k: v for k, v in row.items() if k != "grad_images"} for mode, row in results.items()
        }
        print(flush=True)

        print("3. hardware use of a tesla iteration")
        peak = matmul_peak_gflops(repeats)
        print(f"  fp32 GEMM peak (best of 2048^3 mm and a 3x3 conv, {torch.get_num_threads()} threads): "
              f"{peak:.0f} GFLOP/s")
        report["hardware"] = {"matmul_peak_gflops": peak}
        for mode in ("exact", KEPT):
            row = results.get(mode, {})
            if "median_seconds" not in row:
                continue
            kept_here = kept if mode == KEPT else 1
            flops = tesla_flops(dataclasses.replace(config, keep_graphs=kept_here), steps)
            achieved = flops / row["median_seconds"] / 1e9
            floor = flops / (peak * 1e9) / reference["median_seconds"]
            label = "tesla iteration" if mode == "exact" else f"tesla, {kept_here} kept graphs"
            print(f"  {label}: {flops / 1e9:.1f} GFLOP (conv + matmul) in {row['median_seconds']:.2f} s = "
                  f"{achieved:.0f} GFLOP/s = {achieved / peak:.0%} of the GEMM peak; those FLOPs alone at the peak "
                  f"take {floor:.2f}x the reference's time")
            report["hardware"][mode] = {"gflop": flops / 1e9, "gflops_per_s": achieved,
                                        "fraction_of_peak": achieved / peak, "time_floor_ratio": floor}
        print(flush=True)

    print(f"4. batched students: {STUDENTS} students as one grouped network vs one after another")
    # Batching does the same FLOPs: its speedup cannot exceed the GEMM peak over the sequential students' rate.
    peak = report.get("hardware", {}).get("matmul_peak_gflops") or matmul_peak_gflops(repeats)
    header = (f"{'student step':<20}{'batch':>6}{'sequential steps/s':>20}{'batched steps/s':>17}{'speedup':>9}"
              f"{'target':>15}{'seq. % of peak':>16}{'ceiling':>9}")
    print(header)
    print("-" * len(header))
    batched_rows = []
    for batch in ((4,) if args.quick else (100, 10)):
        batched_rows += batched_student_rows(repeats, batch, 8 if args.quick else 128, 32)
    for row in batched_rows:
        row["ceiling"] = peak / row["sequential_gflops_per_s"]
        print(f"{row['step']:<20}{row['batch']:>6}{row['sequential_steps_per_s']:>20.2f}"
              f"{row['batched_steps_per_s']:>17.2f}{row['speedup']:>8.2f}x"
              f"{'>=' + str(BATCHED_TARGET) + 'x ' + _verdict(row['speedup'], BATCHED_TARGET, True):>15}"
              f"{row['sequential_gflops_per_s'] / peak:>15.0%}{row['ceiling']:>8.2f}x")
    print(f"  ceiling = GEMM peak ({peak:.0f} GFLOP/s) / the sequential students' GFLOP/s (convolutions and matmuls)")
    report["batched_students"] = batched_rows
    # A whole tesla iteration as --student-batching runs it (benchmarks/batched_students.py): what decides auto.
    sizes = dict(images=20, channels=1, size=28, width=8 if args.quick else 128, steps=2 if args.quick else 10)
    iteration = batched_iteration_row(students=STUDENTS, repeats=repeats, **sizes)
    print(f"  tesla iteration, {STUDENTS} students, {sizes['images']} images 1x28x28, width {sizes['width']}, "
          f"{sizes['steps']} steps, DSA: sequential {iteration['sequential_s']:.2f} s, grouped "
          f"{iteration['grouped_s']:.2f} s, speedup {iteration['speedup']:.2f}x (--student-batching auto is "
          f"{'grouped' if device.type == 'cuda' else 'sequential'} on {device.type})")
    report["batched_iteration"] = iteration

    finished = datetime.datetime.now().astimezone()
    report["finished"] = finished.isoformat()
    print(f"\nfinished {finished:%Y-%m-%d %H:%M:%S %Z} ({(finished - started).total_seconds() / 60:.1f} min), "
          f"load average {load_average() or 0:.1f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2, default=float)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
