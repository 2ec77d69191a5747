"""benchmarks/gpu_check.py end to end on CPU with its smallest sizes, so the script a lent GPU runs keeps working."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OPS = ("diff_augment", "nearest_synthetic", "cluster_cvar", "instance_norm_relu_pool")
DTYPES = ("float32", "float64", "bfloat16", "float16")


def test_gpu_check_runs_on_cpu(tmp_path):
    report = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--json",
               str(report)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 failure(s)" in result.stdout

    data = json.loads(report.read_text())
    assert data["card"].startswith("CPU ") and data["device"] == "cpu" and data["failures"] == 0
    rows = {row["name"]: row for row in data["rows"]}
    for op in OPS:
        for dtype in DTYPES:
            assert rows[f"{op} reference {dtype} forward"]["status"] == "ok"
        for backend in ("cpp", "triton"):  # the compiled kernels take every dtype (half precision in float32)
            for dtype in DTYPES:
                assert rows[f"{op} {backend} {dtype} backward"]["status"] == "ok"
    assert rows["diff_augment triton float32 double backward"]["status"] == "ok"
    sections = {row["section"] for row in data["rows"]}
    assert sections == {"ops", "distill", "evaluate", "determinism", "host syncs", "timing"}
    for method in ("experts", "dc", "dsa", "dm", "mtt", "tesla"):
        assert rows[method]["status"] == "ok" and rows[method]["name"] in result.stdout
    assert rows["tesla twice"]["identical"] and rows["tesla twice --deterministic"]["identical"]
    timing = [row for row in data["rows"] if row["section"] == "timing"]
    assert len(timing) == 4 and all(row["grad_cosine"] > 0.99 for row in timing)
    assert "--precision bf16" in timing[-1]["name"]


def test_a_wrong_backend_is_a_mismatch(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    case = gpu_check.op_cases()[3]  # instance_norm_relu_pool

    def call(inputs, backend):
        out = case.call(inputs, backend)
        return out * 1.001 if backend == "cpp" else out

    wrong = gpu_check.OpCase(case.name, case.inputs, call, case.triton_kernel, case.cuda_kernel, case.orders)
    rows = gpu_check.check_op(wrong, "cpp", torch.float32, torch.device("cpu"))
    assert [row["status"] for row in rows] == ["MISMATCH", "MISMATCH", "MISMATCH"]
    assert all(row["status"] == "ok" for row in gpu_check.check_op(case, "cpp", torch.float32, torch.device("cpu")))
