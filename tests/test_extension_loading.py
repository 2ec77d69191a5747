"""fastdd._C and the running torch: a mismatched build is refused with one warning and the references serve."""

import json
import subprocess
import sys
import textwrap

import torch

from fastdd import _extension


def test_the_build_records_the_torch_it_was_compiled_against():
    assert _extension.has_cpp(), f"fastdd._C failed to load: {_extension.load_error()}"
    assert _extension.built_against() == torch.__version__
    record = json.loads(_extension.BUILD_RECORD.read_text())
    assert record["cuda_kernels"] in (True, False)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})


def test_an_extension_built_for_another_torch_is_not_loaded_and_ops_still_work(tmp_path):
    record = tmp_path / "_C_build.json"
    record.write_text(json.dumps({"torch": "2.0.0", "cuda": None, "cuda_kernels": False}))
    result = _run(f"""
        import warnings
        warnings.simplefilter("always")
        import fastdd._extension as extension
        extension.BUILD_RECORD = __import__("pathlib").Path({str(record)!r})
        import torch
        import fastdd.ops as ops
        import fastdd.ops.nearest, fastdd.ops.cvar, fastdd.ops.augment, fastdd.ops.norm_relu_pool
        assert not extension.has_cpp() and "torch 2.0.0" in extension.load_error()
        x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
        y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
        print("nearest", ops.nearest_synthetic(x, y)[0].tolist())
        try:
            ops.nearest_synthetic(x, y, backend="cpp")
        except Exception as error:
            print("cpp refused:", type(error).__name__)
    """)
    assert result.returncode == 0, result.stderr
    assert "nearest [" in result.stdout and "cpp refused" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "built against torch 2.0.0" in line]
    assert len(warnings) == 1, result.stderr  # said once, whatever the number of ops imported
    assert "reference ops" in warnings[0] and "--no-build-isolation" in warnings[0]
