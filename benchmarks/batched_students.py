"""Batched trajectory-matching students: a whole iteration of S students computed as one grouped network against S
students one after another (what ``--student-batching grouped`` and ``sequential`` run).

    python benchmarks/batched_students.py [--students 4 --images 20 --channels 1 --size 28 --width 128 --steps 10
                                           --mode exact --repeats 5 --threads 1 --device cpu --json FILE]
    python benchmarks/batched_students.py --quick      # tiny sizes, a smoke run in seconds

One iteration is what ``TrajectoryMatching.step`` computes for S students: each starts from its own point (a
ConvNet-3 init plus noise) and matches its own target, taking ``--steps`` SGD steps on all ``--images`` synthetic
images with DSA at every step. ``sequential`` is S calls of ``fastdd.distill.trajectory.match_gradients``,
``grouped`` one call of ``fastdd.distill.batched_students.batched_match_gradients`` with the same generators (so the
same minibatches and augmentations). The two are timed alternately (grouped, sequential, grouped, ...) after a
warm-up of each, so that a load change on a shared machine hits both: the median wall time and process CPU time of
each, the speedup (sequential / grouped) and the relative difference of their image gradients.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastdd.distill.batched_students import batched_match_gradients
from fastdd.distill.trajectory import match_gradients
from fastdd.models import build_model, flat_parameters

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


def batched_iteration_row(*, students: int = 4, images: int = 20, channels: int = 1, size: int = 28,
                          width: int = 128, steps: int = 10, mode: str = "exact", repeats: int = 5,
                          device: str = "cpu", augment: str | None = DSA_STRATEGY) -> dict:
    """Median seconds of one iteration of ``students`` students, sequential and grouped (see the module docstring)."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    classes = 10
    net = build_model("convnet", channels=channels, num_classes=classes, image_size=size, width=width,
                      generator=generator).to(device)
    base = flat_parameters(net).detach()
    starts = torch.stack([base + 0.01 * torch.randn(base.shape, generator=generator).to(device)
                          for _ in range(students)])
    targets = starts + 0.01 * torch.randn(starts.shape, generator=generator).to(device)
    syn = torch.randn(images, channels, size, size, generator=generator).to(device)
    labels = torch.arange(classes, device=device).repeat_interleave(images // classes + 1)[:images]
    syn_lr = torch.tensor(0.01, device=device)

    def plans():
        return [torch.Generator().manual_seed(100 + s) for s in range(students)]

    def sequential():
        results = [match_gradients(net, syn, labels, starts[s], targets[s], syn_lr, syn_steps=steps, mode=mode,
                                   augment=augment, generator=g) for s, g in enumerate(plans())]
        return sum(r[1] for r in results)

    def grouped():
        return batched_match_gradients(net, syn, labels, starts, targets, syn_lr, syn_steps=steps, mode=mode,
                                       augment=augment, generators=plans())[1]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    grad_sequential, grad_grouped = sequential(), grouped()  # warm-up, and the gradients to compare
    timings = {"sequential": ([], []), "grouped": ([], [])}
    for _ in range(repeats):
        for name, fn in (("grouped", grouped), ("sequential", sequential)):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            timings[name][0].append(time.perf_counter() - wall)
            timings[name][1].append(time.process_time() - cpu)
    row = {"students": students, "images": images, "image": f"{channels}x{size}x{size}", "width": width,
           "steps": steps, "mode": mode, "device": str(device), "threads": torch.get_num_threads()}
    for name, (walls, cpus) in timings.items():
        row[f"{name}_s"] = statistics.median(walls)
        row[f"{name}_cpu_s"] = statistics.median(cpus)
        row[f"{name}_all_s"] = walls
    row["speedup"] = row["sequential_s"] / row["grouped_s"]
    row["cpu_speedup"] = row["sequential_cpu_s"] / row["grouped_cpu_s"]
    row["grad_relative_difference"] = float((grad_grouped - grad_sequential).norm() / grad_sequential.norm())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=4)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", choices=("exact", "compat", "unrolled"), default="exact")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-augment", action="store_true", help="no DSA")
    parser.add_argument("--quick", action="store_true", help="width 8, 2 steps, 1 repeat")
    parser.add_argument("--json", metavar="FILE", help="also write the row as JSON")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.width, args.steps, args.repeats = 8, 2, 1
    row = batched_iteration_row(students=args.students, images=args.images, channels=args.channels, size=args.size,
                                width=args.width, steps=args.steps, mode=args.mode, repeats=args.repeats,
                                device=args.device, augment=None if args.no_augment else DSA_STRATEGY)
    print(f"{row['students']} students, {row['images']} images {row['image']}, ConvNet width {row['width']}, "
          f"{row['steps']} steps, mode {row['mode']}, {row['device']}, {row['threads']} threads; medians of "
          f"{args.repeats} alternated iterations")
    print(f"  sequential {row['sequential_s']:.3f} s (cpu {row['sequential_cpu_s']:.3f} s)   grouped "
          f"{row['grouped_s']:.3f} s (cpu {row['grouped_cpu_s']:.3f} s)   speedup {row['speedup']:.2f}x "
          f"(cpu {row['cpu_speedup']:.2f}x)   image gradients differ by {row['grad_relative_difference']:.1e}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(row, out, indent=2)


if __name__ == "__main__":
    main()
