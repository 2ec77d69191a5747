"""Compile every Triton kernel of fastdd for real NVIDIA targets on a machine without a GPU, and report their resources.

    python benchmarks/triton_compile_report.py [--targets 80,90] [--tier cli|large|all]
                                               [--dtypes float32,float64,bfloat16,float16] [--json PATH]

The Triton interpreter (``TRITON_INTERPRET=1``, which the test suite uses on CPU) accepts code that the real compiler
rejects, so this script runs the launchers of ``fastdd.kernels`` through Triton's real pipeline (TTIR, TTGIR, LLVM,
PTX, and ``ptxas`` to a cubin) for each ``--targets`` compute capability:

* a stand-in driver (:class:`StandInDriver`) becomes Triton's active driver and names the target, so no GPU or CUDA
  driver is needed;
* ``kernel[grid](...)`` is redirected to ``JITFunction.run(..., warmup=True)``: it binds the arguments, specialises
  and compiles exactly as a launch would, and launches nothing, so the launchers run on CPU tensors;
* every new specialisation (kernel x constexprs x integer/pointer attributes) is compiled once; a compile error is
  recorded with the kernel, its constexprs and the target, and the launcher carries on.

Each cubin's resources come from ``cuobjdump -res-usage`` (shipped with Triton): registers per thread, and local
memory / stack bytes per thread, which are non-zero when ``ptxas`` spilled registers (or placed an array in local
memory). The cases are the launchers' calls at the shapes the command line uses (tier ``cli``: ConvNet on 1x28x28 and
3x32x32 images, IPC 1/10/50, the DSA strategies in modes S and M, the robust loss's assignment) and at large ones
(tier ``large``: 256x3x224x224 augmentation, 50,000 x 100 x 2,048 nearest search, 64 to 224 px norm maps). Tensors
are allocated with ``torch.empty`` where the launcher only passes them on, so large cases cost address space, not RAM.

The script removes ``TRITON_INTERPRET`` from its environment before Triton is imported; run it as its own process.
It exits with status 1 when any specialisation failed to compile.
"""

from __future__ import annotations

import os

# Kernels decorated while TRITON_INTERPRET=1 is set become interpreter functions that cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastdd.kernels  # noqa: E402

TIERS = ("cli", "large")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class StandInDriver(DriverBase):
    """Triton's active driver while compiling: it names a CUDA target and owns no device.

    JITFunction keeps one compile cache per device number, so each target reports its own number (its compute
    capability) and kernels compiled for one target are never reused for another.
    """

    def __init__(self, capability: int):
        super().__init__()
        self.target = GPUTarget("cuda", capability, 32)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton's own driver discovery

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("the stand-in driver compiles only; it builds no launcher")

    def get_benchmarker(self):
        raise NotImplementedError("the stand-in driver compiles only; it runs nothing")


@dataclass
class Specialisation:
    """One compiled (or failed) specialisation of a kernel for a target, and the case that first asked for it."""

    target: str
    kernel: str
    case: str
    constexprs: dict[str, str]
    num_warps: int
    error: str | None = None
    registers: int | None = None
    local_bytes: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes or self.stack_bytes)

    def describe(self) -> str:
        constexprs = ", ".join(f"{name}={value}" for name, value in self.constexprs.items())
        return f"{self.kernel} [{constexprs}] num_warps={self.num_warps} for {self.target} (case {self.case})"


@dataclass
class _Session:
    target: str
    case: str = ""
    seen: set = field(default_factory=set)
    results: list[Specialisation] = field(default_factory=list)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, LOCAL, STACK and SHARED of the one kernel in ``cubin``, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        listing = subprocess.run([CUOBJDUMP, "-res-usage", file.name], capture_output=True, text=True,
                                 check=True).stdout
    function_line = next(line for line in listing.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|STACK|SHARED):(\d+)", function_line)}


def _error_text(error: BaseException) -> str:
    """The error and its causes, outermost first: a failure inside a helper surfaces as a CompilationError at the
    kernel's call site whose cause holds the actual reason."""
    parts = []
    while error is not None:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__
    return "\n-- caused by --\n".join(parts)


def _constexpr_text(value) -> str:
    value = getattr(value, "value", value)
    return str(getattr(value, "name", value))


@contextlib.contextmanager
def _compile_without_launch(session: _Session) -> Iterator[None]:
    """While active, ``kernel[grid](...)`` compiles the specialisation it binds and launches nothing; every new
    specialisation is recorded in ``session`` (a failed one too, once, and the launch returns None)."""
    original_getitem = JITFunction.__getitem__
    original_compile = JITFunction._do_compile

    def warmup_getitem(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=True, **kwargs)

    def recording_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        if (name, key) in session.seen:  # a failed specialisation asked for again
            return None
        session.seen.add((name, key))
        named = {self.params[path[0]].name: _constexpr_text(value) for path, value in constexprs.items()
                 if len(path) == 1}
        record = Specialisation(session.target, name, session.case, named, options.num_warps)
        session.results.append(record)
        try:
            kernel = original_compile(self, key, signature, device, constexprs, options, attrs, warmup)
        except Exception as error:  # noqa: BLE001 - any compile error is the finding
            record.error = _error_text(error)
            return None
        usage = _resource_usage(kernel.asm["cubin"])
        record.registers, record.local_bytes = usage.get("REG"), usage.get("LOCAL")
        record.stack_bytes, record.shared_bytes = usage.get("STACK"), usage.get("SHARED")
        return kernel

    JITFunction.__getitem__ = warmup_getitem
    JITFunction._do_compile = recording_compile
    try:
        yield
    finally:
        JITFunction.__getitem__ = original_getitem
        JITFunction._do_compile = original_compile


# ------------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A launcher call: ``run(dtype)`` calls one launcher of fastdd.kernels with CPU tensors."""

    name: str
    tier: str
    run: Callable[[torch.dtype], object]


def _augment_params(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel parameter rows (identity-like values; compiling does not read them)."""
    real = torch.zeros(batch, 6, dtype=torch.float64)
    real[:, 1:5] = 1.0
    return real, torch.zeros(batch, 5, dtype=torch.int64)


def _augment_case(name: str, tier: str, shape: tuple[int, ...], families: str, shared: bool,
                  align_corners: bool = True) -> list[Case]:
    from fastdd.kernels import diff_augment

    def forward(dtype, with_offset=True):
        images = torch.empty(shape, dtype=dtype)
        real, ints = _augment_params(1 if shared else shape[0], dtype)
        cutout = [shape[2] // 2, shape[3] // 2]
        return diff_augment.diff_augment_forward(images, families, real, ints, cutout, align_corners, with_offset)

    def adjoint(dtype, deterministic=False):
        grad = torch.empty(shape, dtype=dtype)
        real, ints = _augment_params(1 if shared else shape[0], dtype)
        return diff_augment.diff_augment_adjoint(grad, families, real, ints, [shape[2] // 2, shape[3] // 2],
                                                 align_corners, deterministic)

    label = f"diff_augment {name} {'x'.join(map(str, shape))} {families} {'shared' if shared else 'per-image'}"
    cases = [Case(f"{label} forward", tier, forward), Case(f"{label} adjoint", tier, adjoint)]
    if tier == "cli":  # --deterministic's scatter (its term buffers would not fit in memory at the large shapes)
        cases.append(Case(f"{label} adjoint deterministic", tier, lambda dtype: adjoint(dtype, True)))
    if "color" in families:  # the linear part alone, used by the double backward
        cases.append(Case(f"{label} forward without offset", tier, lambda dtype: forward(dtype, with_offset=False)))
    return cases


def _norm_cases(name: str, tier: str, shape: tuple[int, int, int, int], pool: bool) -> list[Case]:
    from fastdd.kernels import instance_norm_relu_pool as norm

    def params_dtype(dtype):
        """Half-precision maps come with float32 parameters and statistics, as under autocast."""
        return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    def tensors(dtype):
        channels = shape[1]
        x = torch.empty(shape, dtype=dtype)
        weight = torch.ones(channels, dtype=params_dtype(dtype))
        return x, weight, torch.zeros_like(weight)

    def forward(dtype):
        x, weight, bias = tensors(dtype)
        return norm.instance_norm_relu_pool_forward(x, weight, bias, 1e-5, pool)

    def pooled_like(x):
        height, width = (x.shape[2] // 2, x.shape[3] // 2) if pool else x.shape[2:]
        return torch.empty(*x.shape[:2], height, width, dtype=x.dtype)

    def backward(dtype):
        x, weight, bias = tensors(dtype)
        stats = torch.empty(shape[:2], dtype=params_dtype(dtype))
        return norm.instance_norm_relu_pool_backward(pooled_like(x), x, weight, bias, stats, stats, pool)

    def double_backward(dtype):
        x, weight, bias = tensors(dtype)
        stats = torch.empty(shape[:2], dtype=params_dtype(dtype))
        return norm.instance_norm_relu_pool_double_backward(pooled_like(x), x, weight, bias, stats, stats,
                                                            torch.empty_like(x), weight, bias, pool)

    label = f"instance_norm_relu_pool {name} {'x'.join(map(str, shape))} {'pool' if pool else 'no pool'}"
    return [Case(f"{label} forward", tier, forward), Case(f"{label} backward", tier, backward),
            Case(f"{label} double backward", tier, double_backward)]


def _nearest_case(name: str, tier: str, points: int, centers: int, dim: int, groups: int) -> Case:
    from fastdd.kernels import nearest_synthetic

    def run(dtype):
        kwargs = {}
        if groups:
            kwargs = dict(point_groups=torch.arange(points) % groups, center_groups=torch.arange(centers) % groups)
        return nearest_synthetic.nearest_synthetic_forward(torch.empty(points, dim, dtype=dtype),
                                                           torch.empty(centers, dim, dtype=dtype), **kwargs)

    return Case(f"nearest_synthetic {name} {points}x{centers}x{dim} groups={groups}", tier, run)


def _cvar_case(name: str, tier: str, samples: int, clusters: int) -> Case:
    from fastdd.kernels import cluster_cvar

    def run(dtype):
        return cluster_cvar.cluster_cvar_weight(torch.zeros(samples, dtype=dtype), torch.arange(samples) % clusters,
                                                clusters, 0.3)

    return Case(f"cluster_cvar {name} {samples} samples {clusters} clusters", tier, run)


FULL_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the DSA default (CIFAR, Fashion-MNIST, ...)
DIGITS_STRATEGY = "color_crop_cutout_scale_rotate"  # MNIST-like digits: no flip


def build_cases() -> list[Case]:
    """Every launcher call of the report, tier ``cli`` first."""
    cases: list[Case] = []
    # Distillation augments a class's real batch and its synthetic images with one shared transform (mode S: one
    # family per call; mode M: the whole strategy); evaluation augments every image with its own transform.
    for channels, size, strategy in ((1, 28, DIGITS_STRATEGY), (3, 32, FULL_STRATEGY)):
        for families in (*strategy.split("_"), strategy):
            for batch, shared in ((256, True), (500, False)):
                cases += _augment_case("cli", "cli", (batch, channels, size, size), families, shared)
    cases += _augment_case("cli align_corners=False", "cli", (256, 3, 32, 32), FULL_STRATEGY, True, False)
    # ConvNet (width 128, depth 3): 28 px images are padded to 32 px maps, so maps are 32, 16 and 8 px; pooling
    # "none" keeps 32 px maps in every block. Batches: IPC 1, 10, 50 of 10 classes, and a real batch of 256.
    for batch in (10, 100, 500, 256):
        for size in (32, 16, 8):
            cases += _norm_cases("cli", "cli", (batch, 128, size, size), True)
    cases += _norm_cases("cli", "cli", (256, 128, 32, 32), False)
    # The robust loss assigns real features (ConvNet embedding, 2048 wide) to the synthetic set's class centres.
    for ipc in (1, 10, 50):
        cases.append(_nearest_case("cli", "cli", 2560, 10 * ipc, 2048, 10))
    cases.append(_nearest_case("cli boundary outliers", "cli", 5000, 500, 2048, 0))
    for samples, clusters in ((256, 10), (2560, 100)):
        cases.append(_cvar_case("cli", "cli", samples, clusters))

    cases += _augment_case("large", "large", (256, 3, 224, 224), FULL_STRATEGY, True)
    for families in FULL_STRATEGY.split("_"):
        cases += _augment_case("large", "large", (256, 3, 224, 224), families, False)
    for size in (64, 128, 224):  # ConvNetD4 on 64 px, ConvNetD5 on 128 px, a 224 px first block
        cases += _norm_cases("large", "large", (8, 128, size, size), True)
    cases += _norm_cases("large", "large", (8, 64, 224, 224), False)
    cases.append(_nearest_case("large", "large", 50_000, 100, 2048, 0))
    cases.append(_nearest_case("large", "large", 50_000, 100, 2048, 10))
    cases.append(_cvar_case("large", "large", 50_000, 100))
    return cases


def compile_cases(cases: list[Case], capabilities: list[int], dtypes: list[torch.dtype]) -> list[Specialisation]:
    """Run every case for every target and dtype with compile-only launches; the specialisations they compiled."""
    results: list[Specialisation] = []
    for capability in capabilities:
        session = _Session(target=f"sm_{capability}")
        triton_driver.set_active(StandInDriver(capability))  # left active: the script is its own process
        with _compile_without_launch(session):
            for case in cases:
                for dtype in dtypes:
                    session.case = f"{case.name} {str(dtype).removeprefix('torch.')}"
                    case.run(dtype)
        results += session.results
    return results


def _table(results: list[Specialisation]) -> str:
    header = f"{'target':7} {'kernel':40} {'warps':>5} {'regs':>5} {'local':>6} {'stack':>6} {'smem':>6}  case / error"
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.target:7} {r.kernel:40} {r.num_warps:>5} {'FAILED':>5} {'':>6} {'':>6} {'':>6}  "
                         f"{r.case}: {r.error.splitlines()[0]}")
        else:
            flag = "  SPILLS" if r.spills else ""
            lines.append(f"{r.target:7} {r.kernel:40} {r.num_warps:>5} {r.registers:>5} {r.local_bytes:>6} "
                         f"{r.stack_bytes:>6} {r.shared_bytes:>6}  {r.case}{flag}")
    return "\n".join(lines)


def _summary(results: list[Specialisation]) -> str:
    lines = []
    for target in sorted({r.target for r in results}):
        mine = [r for r in results if r.target == target]
        failed = sum(r.error is not None for r in mine)
        spilled = sum(r.spills for r in mine)
        lines.append(f"{target}: {len(mine)} specialisations, {failed} failed to compile, {spilled} spill")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    parser.add_argument("--tier", choices=(*TIERS, "all"), default="all")
    parser.add_argument("--dtypes", default="float32,float64", help="image dtypes, comma-separated (float32, float64, "
                        "bfloat16, float16; half-precision norm maps get float32 parameters, as under autocast)")
    parser.add_argument("--json", help="also write the specialisations to this JSON file")
    args = parser.parse_args(argv)

    capabilities = [int(value) for value in args.targets.split(",")]
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    cases = [case for case in build_cases() if args.tier in ("all", case.tier)]
    results = compile_cases(cases, capabilities, dtypes)
    print(f"kernels compiled from {', '.join(fastdd.kernels.__path__)} with Triton {triton.__version__}\n")
    print(_table(results))
    print()
    print(_summary(results))
    for r in results:
        if r.error:
            print(f"\nFAILED: {r.describe()}\n{r.error}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump([dataclasses.asdict(r) | {"spills": r.spills} for r in results], file, indent=1)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
