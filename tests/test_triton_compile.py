"""The Triton kernels compile for real GPUs (sm_80 and sm_90), without a GPU, and do not spill registers.

Every other Triton test runs under ``TRITON_INTERPRET=1``, which accepts code that the real compiler rejects (a
``tl.constexpr`` assigned inside ``tl.static_range`` once crashed every multi-family ``diff_augment``). These tests
run ``benchmarks/triton_compile_report.py``, which calls the launchers of ``fastdd.kernels`` with CPU tensors while
a stand-in driver makes Triton target ``GPUTarget("cuda", 80 | 90, 32)`` and every launch only compiles (TTIR to
PTX, then ``ptxas`` to a cubin), and reads each cubin's registers and local memory with ``cuobjdump``.

Why a subprocess: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before any kernel module is imported, and
``@triton.jit`` decides at decoration time whether a kernel is interpreted. Compiling in this process would mean
reloading the kernel modules (other tests and ``fastdd.ops`` hold the interpreted objects) and replacing Triton's
process-wide active driver; a child process without ``TRITON_INTERPRET`` gets real kernels and leaves this process
untouched. The child processes of one session share a fresh Triton cache folder: each session compiles from
scratch, and the slow test reuses the cubins of the default one (a cache hit is still keyed by source and target).

The default test compiles the command line's shapes in float32, bfloat16 and float16 (the dtypes of
``--precision fp32|bf16|fp16``: half-precision loads and stores around float32 arithmetic; the norm's parameters and
statistics float32) for both targets (a few minutes on one core) and requires no compile failure and no spill. The
slow test adds float64 and the large shapes (256x3x224x224 augmentation, 50,000 x 100 x 2,048 nearest search, 64 to
224 px norm maps) in all four dtypes and requires the same: the kernels sweep large inputs in bounded blocks, so
large shapes must not spill either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "triton_compile_report.py"
TARGETS = "80,90"


def _tools_missing() -> str | None:
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("ptxas", "cuobjdump") if not (tools / name).exists()]
    return f"Triton's NVIDIA backend lacks {', '.join(missing)}" if missing else None


pytestmark = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


@pytest.fixture(scope="module")
def triton_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton-cache")


def _compile_environment(cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run_report(tmp_path: Path, cache: Path, *options: str) -> list[dict]:
    out = tmp_path / "specialisations.json"
    completed = subprocess.run(
        [sys.executable, str(REPORT), "--targets", TARGETS, "--json", str(out), *options],
        env=_compile_environment(cache), cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )
    if not out.exists():
        raise AssertionError(f"the compile report crashed (exit {completed.returncode}):\n{completed.stderr[-5000:]}")
    return json.loads(out.read_text())


def _describe(record: dict) -> str:
    constexprs = ", ".join(f"{name}={value}" for name, value in record["constexprs"].items())
    return (f"{record['kernel']} [{constexprs}] num_warps={record['num_warps']} for {record['target']} "
            f"({record['case']})")


def _check(records: list[dict]) -> None:
    assert {record["target"] for record in records} == {"sm_80", "sm_90"}
    failed = [record for record in records if record["error"]]
    assert not failed, f"{len(failed)} of {len(records)} kernel specialisations failed to compile:\n" + "\n\n".join(
        f"{_describe(record)}:\n{record['error'][:2000]}" for record in failed
    )
    spilled = [record for record in records if record["spills"]]
    assert not spilled, f"{len(spilled)} kernel specialisations spill registers to local memory:\n" + "\n".join(
        f"{_describe(record)}: {record['registers']} registers, {record['local_bytes']} B local, "
        f"{record['stack_bytes']} B stack" for record in spilled
    )


def test_kernels_compile_for_sm80_and_sm90_at_command_line_shapes(tmp_path, triton_cache):
    records = _run_report(tmp_path, triton_cache, "--tier", "cli", "--dtypes", "float32,bfloat16,float16")
    kernels = {record["kernel"].split(".")[0] for record in records}
    assert kernels == {"diff_augment", "instance_norm_relu_pool", "nearest_synthetic", "cluster_cvar"}
    # Every kernel module has specialisations for half-precision pointers (its loads and stores) on both targets.
    for dtype in ("bfloat16", "float16"):
        compiled = {(record["kernel"].split(".")[0], record["target"]) for record in records
                    if record["case"].endswith(f" {dtype}")}
        assert compiled == {(kernel, target) for kernel in kernels for target in ("sm_80", "sm_90")}, dtype
    _check(records)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90_at_all_shapes_and_dtypes(tmp_path, triton_cache):
    _check(_run_report(tmp_path, triton_cache, "--tier", "all", "--dtypes", "float32,float64,bfloat16,float16"))


def test_the_check_reports_code_only_the_interpreter_accepts(tmp_path):
    """A constexpr rebound in an unrolled loop runs under the interpreter; the harness must report it as failed."""
    (tmp_path / "rebinding_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl


        @triton.jit
        def rebinding_kernel(out_ptr, N: tl.constexpr):
            for j in tl.static_range(N):
                i: tl.constexpr = N - 1 - j
                tl.store(out_ptr + i, i)
    """))
    (tmp_path / "compile_it.py").write_text(textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(REPORT.parent)!r}, {str(tmp_path)!r}]
        import torch
        import triton_compile_report as report
        from rebinding_kernel import rebinding_kernel

        case = report.Case("rebinding", "cli", lambda dtype: rebinding_kernel[(1,)](torch.empty(4), N=2))
        records = report.compile_cases([case], [90], [torch.float32])
        print(json.dumps([(r.kernel, r.constexprs, r.error) for r in records]))
    """))
    completed = subprocess.run([sys.executable, str(tmp_path / "compile_it.py")],
                               env=_compile_environment(tmp_path / "triton-cache"), capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    [(kernel, constexprs, error)] = json.loads(completed.stdout.splitlines()[-1])
    assert kernel == "rebinding_kernel.rebinding_kernel" and constexprs == {"N": "2"}
    assert "constexpr cannot be reassigned" in error
