"""The CUDA sources compile and link, on any machine with nvcc (CI has no GPU: compile-only).

One test builds the whole CUDA flavour of ``fastdd._C`` with setup.py's own logic (``FASTDD_CUDA=1``: every
``csrc/cuda/*.cu`` through nvcc, the CPU sources through the host compiler, ``-DFASTDD_WITH_CUDA``, the headers and
libraries of the pip package ``nvidia``) into a temporary folder, so the repository's CPU ``fastdd/_C.so`` is left
alone. It then loads the library in a fresh process (every symbol resolved against torch's CUDA libraries) and checks
that the ops have CUDA kernels. It takes about 1-2 minutes on 2 cores, for one GPU architecture.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
# One architecture keeps CI time down; sm_80 is the oldest the kernels are tuned for. With its PTX, as the default
# list of setup.py ships PTX for cards newer than its binaries.
ARCH_LIST = os.environ.get("FASTDD_TEST_CUDA_ARCH", "8.0+PTX")
# Ops whose CUDA kernels must be registered by the library (a kernel file that compiles but no longer registers
# itself would otherwise pass unnoticed).
CUDA_OPS = ("fastdd::nearest_synthetic", "fastdd::nearest_synthetic_backward")


def _cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME, /usr/local/cuda, torch's guess, or the folder above nvcc."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", cpp_extension.CUDA_HOME]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    return None


def _run(command: list[str], env: dict[str, str], what: str) -> str:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        errors = "\n".join(line for line in output.splitlines() if "error" in line.lower())
        pytest.fail(
            f"{what} failed (exit {result.returncode}). Error lines:\n{errors}\n--- output (tail) ---\n"
            f"{output[-15000:]}",
            pytrace=False,
        )
    return output


@pytest.mark.slow
def test_cuda_sources_compile_and_link(tmp_path):
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("nvcc not found: install a CUDA toolkit (e.g. /usr/local/cuda) or set CUDA_HOME to run this check")
    env = {**os.environ, "FASTDD_CUDA": "1", "CUDA_HOME": cuda_home, "TORCH_CUDA_ARCH_LIST": ARCH_LIST}
    started = time.perf_counter()
    _run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")],
        env,
        "building fastdd._C with its CUDA kernels",
    )
    library = tmp_path / "lib" / "fastdd" / "_C.so"
    assert library.exists(), f"setup.py reported success but wrote no {library}"
    compiled = sorted(p.name for p in (tmp_path / "temp").rglob("*.o") if p.parent.name == "cuda")
    expected = sorted(p.with_suffix(".o").name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    assert compiled == expected, f"nvcc compiled {compiled}, csrc/cuda holds {expected}"

    # A fresh process loads the library (dlopen resolves every symbol now) and lists the CUDA registrations.
    check = (
        "import sys, torch\n"
        f"torch.ops.load_library({str(library)!r})\n"
        f"missing = [op for op in {CUDA_OPS!r} if not torch._C._dispatch_has_kernel_for_dispatch_key(op, 'CUDA')]\n"
        "sys.exit(f'no CUDA kernel registered for {missing}' if missing else 0)\n"
    )
    _run([sys.executable, "-c", check], env, "loading the CUDA build of fastdd._C")
    print(f"CUDA build of fastdd._C ({ARCH_LIST}) compiled, linked and loaded in {time.perf_counter() - started:.0f} s")


def test_default_arch_list_ships_ptx():
    # Without PTX a card newer than the listed binaries (Blackwell) finds no CUDA kernel of fastdd._C at all.
    import ast

    tree = ast.parse((ROOT / "setup.py").read_text())
    value = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                 and getattr(node.targets[0], "id", None) == "DEFAULT_CUDA_ARCHS")
    archs = value.split(";")
    assert archs[-1].endswith("+PTX") and {"7.5", "8.0"} <= {a.removesuffix("+PTX") for a in archs}
