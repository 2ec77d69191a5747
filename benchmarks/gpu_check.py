"""One prepared command that checks fastdd on a GPU (or, with small sizes, on a CPU so CI keeps it working).

    python benchmarks/gpu_check.py --device cuda --json gpu_check.json      # a few minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --quick                     # under a minute on one core

Checks, printed as one table and written as JSON (with the card's name, or the CPU's):

1. ops: every op of ``fastdd.ops`` x every backend that can run here x float32, float64, bfloat16, float16, against
   the pure-PyTorch reference evaluated in float64 on CPU: forward, backward and (where the op has one) double
   backward. In bfloat16 / float16 the ops compute in float32; instance_norm_relu_pool then gets float32 weight and
   bias, as under ``torch.autocast``. A backend that does not take a dtype is reported ``unsupported``, one that
   cannot run on this device ``unavailable``; neither is a failure.
2. distill: a tiny ``fastdd distill --device DEVICE`` of every method (``fastdd experts`` first for mtt and tesla),
   and a tiny ``fastdd evaluate`` of one of the sets.
3. determinism: the same tesla run twice with one seed, without and with ``--deterministic``; on CPU both must give
   identical sets, on CUDA the plain runs are only reported (float atomics), the ``--deterministic`` ones must match.
4. host syncs (CUDA only): ``torch.cuda.set_sync_debug_mode("warn")`` counts the synchronising calls of one
   distillation iteration (a 2-iteration run minus a 1-iteration run), reported, not judged.
5. timing: one trajectory-matching iteration of fastdd's ``tesla`` (exact) and ``mtt`` (unrolled) modes against the
   reference MTT unroll (``benchmarks/trajectory.py``'s fresh-process measurement), time and peak memory.

The exit status is 1 when any op mismatches its reference, any command fails, or a run that must be reproducible is
not; timings are information.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import cpu_model, describe_machine
from trajectory import DSA_STRATEGY, REFERENCE_MTT, Config, _cosine, measure_in_fresh_process

from fastdd.ops import (
    cluster_cvar,
    diff_augment,
    instance_norm_relu_pool,
    nearest_synthetic,
    sample_augment_params,
)
from fastdd.ops._dispatch import KERNEL_DTYPES, unavailable_reason

OK, FAILED, MISMATCH = "ok", "FAILED", "MISMATCH"
UNSUPPORTED, UNAVAILABLE, REPORTED = "unsupported", "unavailable", "reported"
FAILING = (FAILED, MISMATCH)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BACKENDS = ("reference", "cpp", "triton")
# Largest allowed ||result - float64 reference|| / ||float64 reference|| per dtype (inputs rounded to the dtype first).
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
DERIVATIVES = ("forward", "backward", "double backward")


@dataclass(frozen=True)
class OpCase:
    """One op as the check calls it.

    Attributes:
        name: the op's name in ``fastdd.ops``.
        inputs: ``generator -> [float64 CPU tensors]``, the differentiable inputs.
        call: ``(inputs, backend) -> output``, a floating-point tensor differentiable w.r.t. every input.
        index: ``(inputs, backend) -> int tensor`` that must equal the reference's exactly, or None.
        triton_kernel, cuda_kernel: where its compiled kernels are (as ``fastdd.ops._dispatch`` takes them).
        orders: how many derivatives every backend has (1 or 2).
        master_inputs: positions of the inputs that stay float32 when the checked dtype is bfloat16 or float16 (the
            parameters autocast leaves in float32).
    """

    name: str
    inputs: Callable[[torch.Generator], list[torch.Tensor]]
    call: Callable[[list[torch.Tensor], str], torch.Tensor]
    triton_kernel: str
    cuda_kernel: bool
    orders: int
    index: Callable[[list[torch.Tensor], str], torch.Tensor] | None = None
    master_inputs: tuple[int, ...] = ()

    def input_dtypes(self, count: int, dtype: torch.dtype) -> list[torch.dtype]:
        """The dtype of each of ``count`` inputs when the check runs in ``dtype``."""
        half = dtype in (torch.bfloat16, torch.float16)
        return [torch.float32 if half and i in self.master_inputs else dtype for i in range(count)]


def _augment_case() -> OpCase:
    generator = torch.Generator().manual_seed(11)
    params = sample_augment_params(3, (9, 10), mode="M", generator=generator)  # every family, one draw per image

    def call(inputs, backend):
        return diff_augment(inputs[0], params, backend=backend)

    return OpCase("diff_augment", lambda g: [torch.randn(3, 3, 9, 10, dtype=torch.float64, generator=g)], call,
                  "diff_augment", False, 2)


def _nearest_case() -> OpCase:
    point_groups = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0])
    center_groups = torch.tensor([0, 1, 0, 1, 1])

    def run(inputs, backend):
        points, centers = inputs
        return nearest_synthetic(points, centers, point_groups=point_groups.to(points.device),
                                 center_groups=center_groups.to(points.device), backend=backend)

    def inputs(g):
        return [torch.randn(13, 7, dtype=torch.float64, generator=g), torch.randn(5, 7, dtype=torch.float64,
                                                                                   generator=g)]

    return OpCase("nearest_synthetic", inputs, lambda x, b: run(x, b)[1], "nearest_synthetic", True, 2,
                  index=lambda x, b: run(x, b)[0])


def _cvar_case() -> OpCase:
    assign = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 3, 3, 2, 1, 0, 0, 2, 1, 3, 0, 1, 2, 0])

    def call(inputs, backend):
        return cluster_cvar(inputs[0], assign.to(inputs[0].device), 4, 0.8, backend=backend)

    # A permutation of distinct values: no ties whose order rounding could change.
    return OpCase("cluster_cvar", lambda g: [torch.randperm(23, generator=g).double().div(8)], call,
                  "cluster_cvar", False, 2)


def _norm_case() -> OpCase:
    def call(inputs, backend):
        return instance_norm_relu_pool(*inputs, backend=backend)

    def inputs(g):
        return [torch.randn(3, 4, 7, 9, dtype=torch.float64, generator=g),
                1 + 0.1 * torch.randn(4, dtype=torch.float64, generator=g),
                0.1 * torch.randn(4, dtype=torch.float64, generator=g)]

    return OpCase("instance_norm_relu_pool", inputs, call, "instance_norm_relu_pool", False, 2, master_inputs=(1, 2))


def op_cases() -> list[OpCase]:
    return [_augment_case(), _nearest_case(), _cvar_case(), _norm_case()]


def _derivatives(case: OpCase, inputs: list[torch.Tensor], backend: str, orders: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """[forward, backward..., double backward...] flattened to float64 CPU tensors: the output, the gradients of
    <output, v> w.r.t. the inputs, and the gradients of <those gradients, w> w.r.t. the inputs and v."""
    inputs = [t.detach().requires_grad_(True) for t in inputs]
    output = case.call(inputs, backend)
    results = [output]
    if orders >= 1:
        v = torch.randn(output.shape, dtype=torch.float64, generator=generator).to(output).requires_grad_(True)
        grads = torch.autograd.grad(output, inputs, v, create_graph=orders >= 2)
        results.append(torch.cat([g.flatten() for g in grads]))
        if orders >= 2:
            weights = [torch.randn(g.shape, dtype=torch.float64, generator=generator).to(g) for g in grads]
            total = sum((g * w).sum() for g, w in zip(grads, weights))
            second = torch.autograd.grad(total, [*inputs, v], allow_unused=True)
            results.append(torch.cat([(torch.zeros_like(t) if s is None else s).flatten()
                                      for s, t in zip(second, [*inputs, v])]))
    return [r.detach().double().cpu().flatten() for r in results]


def _relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    return float((value - expected).norm() / expected.norm().clamp_min(1e-300))


def check_op(case: OpCase, backend: str, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Rows of one op x backend x dtype: one per derivative order, or one ``unsupported`` / ``unavailable`` row."""
    row = {"section": "ops", "name": f"{case.name} {backend} {str(dtype).removeprefix('torch.')}"}
    probe = torch.empty(0, dtype=dtype, device=device)
    why = unavailable_reason(backend, probe, triton_kernel=case.triton_kernel, cuda_kernel=case.cuda_kernel)
    if why is not None:
        status = UNSUPPORTED if dtype not in KERNEL_DTYPES else UNAVAILABLE
        return [{**row, "status": status, "detail": why}]
    # Rounded to the dtype first, so the float64 reference sees the very inputs the backend sees.
    raw = case.inputs(torch.Generator().manual_seed(0))
    dtypes = case.input_dtypes(len(raw), dtype)
    inputs = [t.to(d).double() for t, d in zip(raw, dtypes)]
    try:
        expected = _derivatives(case, inputs, "reference", case.orders, torch.Generator().manual_seed(1))
        got = _derivatives(case, [t.to(device, d) for t, d in zip(inputs, dtypes)], backend, case.orders,
                           torch.Generator().manual_seed(1))
    except Exception as error:  # a crash of a backend is this check's finding, not the script's end
        return [{**row, "status": FAILED, "detail": f"{type(error).__name__}: {str(error).splitlines()[0]}"}]
    rows = []
    tolerance = RELATIVE_TOLERANCE[dtype]
    for order, (value, want) in enumerate(zip(got, expected)):
        error = _relative_error(value, want)
        rows.append({**row, "name": f"{row['name']} {DERIVATIVES[order]}", "status": OK if error <= tolerance else
                     MISMATCH, "detail": f"relative error {error:.1e} (limit {tolerance:.0e})", "error": error})
    if case.orders < 2:
        rows.append({**row, "name": f"{row['name']} double backward", "status": UNSUPPORTED,
                     "detail": "the op has no double backward"})
    if case.index is not None and dtype in KERNEL_DTYPES:
        same = torch.equal(case.index([t.to(device, d) for t, d in zip(inputs, dtypes)], backend).cpu(),
                           case.index(inputs, "reference"))
        rows.append({**row, "name": f"{row['name']} index", "status": OK if same else MISMATCH,
                     "detail": "equal to the reference's" if same else "differs from the reference's"})
    return rows


def op_rows(device: torch.device) -> list[dict]:
    return [row for case in op_cases() for dtype in DTYPES for backend in BACKENDS
            for row in check_op(case, backend, dtype, device)]


# ------------------------------------------------------------------------------------------------ commands


def run_cli(*args: object) -> tuple[int, str, float]:
    """``fastdd ARGS`` in this process: (exit code, output, seconds)."""
    from typer.testing import CliRunner

    from fastdd.cli import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, [str(a) for a in args])
    output = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "".join(traceback.format_exception(result.exception))
    return result.exit_code, output, time.perf_counter() - started


@dataclass(frozen=True)
class Sizes:
    """The tiny settings of the command checks (``--quick``: smaller still)."""

    ipc: int
    width: int
    iterations: int
    experts: int
    expert_epochs: int


def method_options(method: str, sizes: Sizes, experts: Path) -> list[object]:
    options: list[object] = ["--ipc", sizes.ipc, "--width", sizes.width, "--iterations", sizes.iterations, "--quiet"]
    if method in ("dc", "dsa", "dm"):
        options += ["--batch-real", 16]
    if method in ("dc", "dsa"):
        options += ["--outer-loop", 2, "--inner-loop", 1]
    if method in ("mtt", "tesla"):
        options += ["--syn-steps", 3, "--expert-epochs", 1, "--max-start-epoch", 2, "--lr-img", 10, "--lr-lr", 1e-5,
                    "--experts", experts]
    return options


def _command_row(section: str, name: str, code: int, output: str, seconds: float) -> dict:
    if code == 0:
        return {"section": section, "name": name, "status": OK, "detail": f"{seconds:.1f} s", "seconds": seconds}
    last = output.strip().splitlines()[-1] if output.strip() else f"exit code {code}"
    return {"section": section, "name": name, "status": FAILED, "detail": last, "output": output}


def command_rows(device: str, sizes: Sizes, work: Path) -> list[dict]:
    """A tiny experts run, a tiny distill of every method, and an evaluate of the dm set."""
    experts = work / "experts"
    code, output, seconds = run_cli("experts", "--device", device,
                                    "--num-experts", sizes.experts, "--epochs", sizes.expert_epochs, "--width",
                                    sizes.width, "--out", experts, "--quiet")
    rows = [_command_row("distill", "experts", code, output, seconds)]
    for method in ("dc", "dsa", "dm", "mtt", "tesla"):
        code, output, seconds = run_cli("distill", "--method", method, "--device", device, "--out", work / method,
                                        *method_options(method, sizes, experts))
        rows.append(_command_row("distill", method, code, output, seconds))
    report = work / "evaluate.json"
    code, output, seconds = run_cli("evaluate", work / "dm", "--device", device, "--runs", 1, "--epochs", 2,
                                    "--json", report, "--quiet")
    row = _command_row("evaluate", "dm set, 1 run", code, output, seconds)
    if code == 0:
        accuracy = json.loads(report.read_text())["models"]["convnet"]["acc"]["mean"]
        row["detail"] += f", convnet accuracy {accuracy:.1f} %"
    return rows + [row]


def _synthetic_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "synset.safetensors")


def _identical(a: Path, b: Path) -> bool:
    first, second = _synthetic_tensors(a), _synthetic_tensors(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def determinism_rows(device: str, sizes: Sizes, work: Path) -> list[dict]:
    """The tesla run of ``command_rows`` repeated with its seed, and two runs with ``--deterministic``."""
    rows = []
    experts = work / "experts"
    for flag in ((), ("--deterministic",)):
        name = "tesla twice" + (" --deterministic" if flag else "")
        folders = [work / f"tesla{'-det' if flag else ''}-{run}" for run in (1, 2)]
        if not flag:
            folders[0] = work / "tesla"  # already run by command_rows
        failed = None
        for folder in folders:
            if folder.exists():
                continue
            code, output, seconds = run_cli("distill", "--method", "tesla", "--device", device, "--out", folder,
                                            *flag, *method_options("tesla", sizes, experts))
            if code != 0:
                failed = _command_row("determinism", name, code, output, seconds)
                break
        if failed is not None or not folders[0].exists():
            rows.append(failed or {"section": "determinism", "name": name, "status": FAILED,
                                   "detail": "the first run failed"})
            continue
        same = _identical(*folders)
        must_match = torch.device(device).type == "cpu" or bool(flag)
        status = OK if same else (MISMATCH if must_match else REPORTED)
        detail = "identical synthetic sets" if same else "the synthetic sets differ"
        rows.append({"section": "determinism", "name": name, "status": status, "detail": detail, "identical": same})
    return rows


def host_sync_rows(device: str, sizes: Sizes, work: Path) -> list[dict]:
    """Synchronising CUDA calls of one tesla and one dsa iteration (2 iterations minus 1), CUDA only."""
    if torch.device(device).type != "cuda":
        return [{"section": "host syncs", "name": "tesla, dsa", "status": UNAVAILABLE, "detail": "CUDA only"}]
    rows = []
    for method in ("tesla", "dsa"):
        counts = []
        for iterations in (1, 2):
            options = method_options(method, Sizes(sizes.ipc, sizes.width, iterations, sizes.experts,
                                                    sizes.expert_epochs), work / "experts")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    code, output, seconds = run_cli("distill", "--method", method, "--device", device, "--out",
                                                    work / f"sync-{method}-{iterations}", *options)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            if code != 0:
                rows.append(_command_row("host syncs", method, code, output, seconds))
                break
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
        else:
            rows.append({"section": "host syncs", "name": f"{method}, one iteration", "status": REPORTED,
                         "detail": f"{counts[1] - counts[0]} synchronising calls (whole 1-iteration run: {counts[0]})",
                         "per_iteration": counts[1] - counts[0]})
    return rows


# ------------------------------------------------------------------------------------------------- timing


def timing_rows(device: str, quick: bool) -> list[dict]:
    """One trajectory-matching iteration: fastdd tesla and mtt against the reference MTT unroll, fresh processes."""
    config = Config(images=10 if quick else 100, width=8 if quick else 128, image_size=32, syn_lr=0.01,
                    augment=DSA_STRATEGY, repeats=1 if quick else 3, dtype="float32", device=device,
                    allocator_peak=False)
    steps = 2 if quick else 20
    measured = {mode: measure_in_fresh_process(config, mode, steps) for mode in (REFERENCE_MTT, "unrolled", "exact")}
    # bf16 on CUDA, and on a CPU too (autocast bf16); fp16 is CUDA only.
    precisions = ("bf16", "fp16") if torch.device(device).type == "cuda" else ("bf16",)
    for precision in precisions:
        measured[f"exact-{precision}"] = measure_in_fresh_process(replace(config, precision=precision), "exact", steps)
    reference = measured[REFERENCE_MTT]
    names = {REFERENCE_MTT: "reference MTT unroll", "unrolled": "fastdd mtt (unrolled)", "exact": "fastdd tesla",
             **{f"exact-{p}": f"fastdd tesla --precision {p}" for p in precisions}}
    rows = []
    for mode, result in measured.items():
        row = {"section": "timing", "name": f"{names[mode]}, {config.images} images, width {config.width}, "
               f"{steps} steps"}
        if "error" in result or "error" in reference:
            error = result.get("error") or reference["error"]
            rows.append({**row, "status": FAILED, "detail": error.strip().splitlines()[-1], "output": error})
            continue
        time_ratio = result["median_seconds"] / reference["median_seconds"]
        memory_ratio = result["peak_bytes"] / max(reference["peak_bytes"], 1)
        cosine = _cosine(result["grad_images"], reference["grad_images"])
        rows.append({**row, "status": OK if cosine > 0.99 else MISMATCH,
                     "detail": f"{result['median_seconds']:.3f} s ({time_ratio:.2f}x ref), peak "
                               f"{result['peak_bytes'] / 2**20:.0f} MiB ({memory_ratio:.2f}x ref), gradient cosine "
                               f"{cosine:.4f}",
                     "seconds": result["median_seconds"], "peak_bytes": result["peak_bytes"],
                     "time_ratio": time_ratio, "memory_ratio": memory_ratio, "grad_cosine": cosine})
    return rows


# --------------------------------------------------------------------------------------------------- main


def print_table(rows: list[dict]) -> None:
    width = max(len(row["name"]) for row in rows) + 2
    header = f"{'section':<12}{'check':<{width}}{'result':<13}detail"
    print(header)
    print("-" * max(len(header), 100))
    for row in rows:
        print(f"{row['section']:<12}{row['name']:<{width}}{row['status']:<13}{row['detail']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is one)")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes (for CI on a CPU)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows and the machine as JSON")
    parser.add_argument("--skip-timing", action="store_true", help="leave out the timing section")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {cpu_model()}"
    started = datetime.datetime.now().astimezone()
    print(f"fastdd GPU check on {card} ({describe_machine(device)})", flush=True)
    sizes = Sizes(ipc=1, width=8, iterations=2, experts=1, expert_epochs=3) if args.quick else \
        Sizes(ipc=2, width=16, iterations=3, experts=2, expert_epochs=3)
    rows = op_rows(device)
    with tempfile.TemporaryDirectory(prefix="fastdd-gpu-check-") as folder:
        work = Path(folder)
        rows += command_rows(args.device, sizes, work)
        rows += determinism_rows(args.device, sizes, work)
        rows += host_sync_rows(args.device, sizes, work)
    if not args.skip_timing:
        rows += timing_rows(args.device, args.quick)
    print_table(rows)
    failures = [row for row in rows if row["status"] in FAILING]
    finished = datetime.datetime.now().astimezone()
    print(f"\n{len(failures)} failure(s) in {len(rows)} checks, {(finished - started).total_seconds():.0f} s")
    for row in failures:
        if "output" in row:
            print(f"\n--- {row['section']} {row['name']} ---\n{row['output'].strip()}")
    if args.json:
        report = {"card": card, "device": args.device, "machine": describe_machine(device), "quick": args.quick,
                  "torch": torch.__version__, "started": started.isoformat(), "finished": finished.isoformat(),
                  "failures": len(failures), "rows": rows}
        with contextlib.suppress(AttributeError):
            report["cuda"] = torch.version.cuda
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
