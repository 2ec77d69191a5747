"""Deterministic mode: torch's switch, and fastdd's order-fixed replacements of its float-atomic GPU kernels."""

import os

import pytest
import torch

from fastdd.determinism import CUBLAS_WORKSPACE_ENV, deterministic_algorithms, deterministic_enabled
from fastdd.kernels import diff_augment as augment_kernels
from fastdd.ops import diff_augment, sample_augment_params
from fastdd.ops._augment_compiled import kernel_arguments

STRATEGIES = ["color_crop_cutout_flip_scale_rotate", "crop_flip", "scale_rotate", "color", "rotate_color_cutout"]


def test_mode_is_scoped_and_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv(CUBLAS_WORKSPACE_ENV, raising=False)
    assert not deterministic_enabled()
    with deterministic_algorithms():
        assert deterministic_enabled() and os.environ[CUBLAS_WORKSPACE_ENV]
    assert not deterministic_enabled()
    with deterministic_algorithms(False):
        assert not deterministic_enabled()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triton_adjoint_without_atomics_equals_the_atomic_one(strategy, dtype, generator):
    params = sample_augment_params(3, (7, 9), strategy=strategy, mode="M", generator=generator)
    grad = torch.randn(3, 2, 7, 9, generator=generator, dtype=dtype)
    args = kernel_arguments(params, grad.device)
    atomic = augment_kernels.diff_augment_adjoint(grad, *args)
    ordered = augment_kernels.diff_augment_adjoint(grad, *args, deterministic=True)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(ordered, atomic, **tolerance)
    assert torch.equal(ordered, augment_kernels.diff_augment_adjoint(grad, *args, deterministic=True))


def test_deterministic_mode_reaches_the_triton_adjoint(monkeypatch, generator):
    calls = []
    adjoint = augment_kernels.diff_augment_adjoint

    def recording(*args, deterministic=False):
        calls.append(deterministic)
        return adjoint(*args, deterministic=deterministic)

    monkeypatch.setattr(augment_kernels, "diff_augment_adjoint", recording)
    params = sample_augment_params(2, (6, 6), mode="M", generator=generator)
    x = torch.randn(2, 3, 6, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(diff_augment(x, params, backend="triton").sum(), x)
    with deterministic_algorithms():
        (ordered,) = torch.autograd.grad(diff_augment(x, params, backend="triton").sum(), x)
    assert calls == [False, True]
    torch.testing.assert_close(ordered, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("flag", [[], ["--deterministic"]])
def test_commands_run_in_the_mode_they_are_given(flag, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fastdd.cli import app
    from fastdd.distill import experts_job, job

    seen = []

    def recording(real):
        def call(*args, **kwargs):
            seen.append(deterministic_enabled())
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(job, "run_distillation", recording(job.run_distillation))
    monkeypatch.setattr(experts_job, "train_experts", recording(experts_job.train_experts))
    tiny = ["--width", "8", "--quiet", *flag]
    runner = CliRunner()
    result = runner.invoke(app, ["distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--batch-real", "16",
                                 "--out", str(tmp_path / "dm"), *tiny])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["experts", "--num-experts", "1", "--epochs", "1", "--out", str(tmp_path / "e"), *tiny])
    assert result.exit_code == 0, result.output
    assert seen == [bool(flag)] * 2 and not deterministic_enabled()
