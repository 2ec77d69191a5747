"""Mixed precision: autocast for the forward passes, float32 master copies, and --precision on the commands."""

import json

import pytest
import torch
from torch.nn.utils import parameters_to_vector
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.distill.trajectory import match_gradients
from fastdd.io import SyntheticSet
from fastdd.models import build_model
from fastdd.precision import at_least_float32, autocast, check_precision, grad_scaler, step_loss_scale
from fastdd.training import predict_logits, train_epoch

from cli_errors import assert_one_sentence_error


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_precision_names_and_devices():
    check_precision("bf16", "cpu")
    with pytest.raises(ValueError, match="one of fp32, bf16, fp16"):
        check_precision("fp8", "cpu")
    with pytest.raises(ValueError, match="CUDA only"):
        check_precision("fp16", "cpu")
    assert grad_scaler("bf16", "cpu") is None and step_loss_scale("bf16") == 1.0 and step_loss_scale("fp16") > 1


def test_autocast_runs_matmuls_in_bf16_and_keeps_fp32_outside():
    a = torch.ones(2, 3)
    with autocast("fp32", "cpu"):
        assert (a @ a.T).dtype == torch.float32
    with autocast("bf16", "cpu"):
        product = a @ a.T
    assert product.dtype == torch.bfloat16 and at_least_float32(product).dtype == torch.float32
    assert at_least_float32(a.double()).dtype == torch.float64


@pytest.fixture
def student(generator):
    net = build_model("convnet", channels=3, num_classes=4, image_size=12, width=16, depth=2, generator=generator)
    start = parameters_to_vector(net.parameters()).detach()
    target = start + 0.02 * torch.randn(start.shape, generator=generator)
    images = torch.randn(12, 3, 12, 12, generator=generator)
    return net, images, torch.arange(12) % 4, start, target


@pytest.mark.parametrize("mode", ["exact", "compat", "unrolled"])
def test_bf16_matching_gradients_are_float32_and_close_to_fp32(student, mode):
    net, images, labels, start, target = student
    results = {}
    for precision in ("fp32", "bf16"):
        results[precision] = match_gradients(
            net, images, labels, start, target, 0.01, syn_steps=3, batch_syn=6, mode=mode,
            augment="color_crop_flip_scale_rotate", generator=torch.Generator().manual_seed(3), precision=precision,
        )
    (loss32, img32, lr32), (loss16, img16, lr16) = results["fp32"], results["bf16"]
    assert img16.dtype == lr16.dtype == loss16.dtype == torch.float32
    assert torch.isfinite(img16).all()
    # bf16 keeps ~3 significant digits per product; the matching loss is a ratio of parameter distances (float32),
    # the image gradient a sum of many rounded terms: close in direction, not bitwise.
    assert not torch.equal(img16, img32)  # autocast really ran
    torch.testing.assert_close(loss16, loss32, rtol=2e-3, atol=0)
    assert _cosine(img16, img32) > 0.98
    torch.testing.assert_close(lr16, lr32, rtol=0.1, atol=1e-6)


def test_bf16_training_epoch_learns_like_fp32(generator):
    images = torch.randn(64, 1, 8, 8, generator=generator)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long()
    losses = {}
    for precision in ("fp32", "bf16"):
        net = build_model("convnet", channels=1, num_classes=2, image_size=8, width=8, depth=2,
                          generator=torch.Generator().manual_seed(0))
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        losses[precision] = [
            train_epoch(net, optimizer, images, labels, batch_size=16, generator=torch.Generator().manual_seed(e),
                        precision=precision)
            for e in range(3)
        ]
        assert all(p.dtype == torch.float32 for p in net.parameters())
        logits = predict_logits(net, images, precision=precision)
        assert logits.dtype == torch.float32
    assert losses["bf16"] != losses["fp32"]
    torch.testing.assert_close(torch.tensor(losses["bf16"]), torch.tensor(losses["fp32"]), rtol=0.03, atol=0)


def test_fp16_on_the_cpu_is_one_sentence(tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["distill", "--precision", "fp16", "--out", str(out), "--quiet"])
    assert_one_sentence_error(result, "CUDA only")
    assert not out.exists()


@pytest.mark.parametrize("method", ["tesla", "dsa"])
def test_bf16_distill_then_evaluate_end_to_end(method, tmp_path):
    out = tmp_path / method
    tiny = ["--width", "8", "--quiet", "--ipc", "1", "--iterations", "2", "--precision", "bf16"]
    if method == "tesla":
        tiny += ["--num-experts", "1", "--expert-epochs", "1", "--max-start-epoch", "1", "--syn-steps", "2"]
    else:
        tiny += ["--batch-real", "16"]
    runner = CliRunner()
    result = runner.invoke(app, ["distill", "--method", method, "--out", str(out), *tiny])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "synset.json").read_text())
    assert meta["hyperparameters"]["precision"] == "bf16"
    images = SyntheticSet.load(out).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["evaluate", str(out), "--runs", "1", "--epochs", "2", "--precision", "bf16",
                                 "--json", str(report), "--quiet"])
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads(report.read_text())["models"]["convnet"]["acc"]["mean"] <= 100
