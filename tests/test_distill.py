"""End-to-end distillation on the embedded digits set with tiny settings: outputs, determinism, resume, NaN stop."""

import json

import pytest
import torch

from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.errors import FastddError
from fastdd.evaluate import EvalConfig, evaluate_synthetic_set
from fastdd.io import SyntheticSet

TINY = {
    "dc": dict(ipc=2, iterations=2, width=32, batch_real=16, outer_loop=2, inner_loop=1),
    "dsa": dict(ipc=2, iterations=2, width=32, batch_real=16, outer_loop=2, inner_loop=1),
    "dm": dict(ipc=2, iterations=3, width=32, batch_real=16),
}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(method, digits, **overrides):
    cls = get_distiller(method)
    cfg = cls.config_class.from_options({**TINY[method], **overrides}, method=method)
    return cls(cfg, digits)


@pytest.mark.parametrize("method", ["dc", "dsa", "dm"])
def test_distill_then_evaluate(method, digits, tmp_path):
    distiller = make(method, digits)
    initial = distiller.images.detach().clone()
    synset = run_distillation(distiller, tmp_path, checkpoint_every=1, progress=False)
    assert synset.images.shape == (20, 1, 8, 8)
    assert torch.equal(synset.labels, torch.arange(10).repeat_interleave(2))
    assert torch.isfinite(synset.images).all()
    assert not torch.equal(synset.images, initial), "the images were never updated"
    for name in ("synset.safetensors", "synset.json", "synset.png", "checkpoint.pt", "metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, TINY[method]["iterations"] + 1))
    assert all(r["loss"] >= 0 for r in records)

    loaded = SyntheticSet.load(tmp_path)
    assert torch.equal(loaded.images, synset.images)
    assert loaded.meta["method"] == method and loaded.meta["ipc"] == 2
    result = evaluate_synthetic_set(loaded, digits, models=["convnet"], config=EvalConfig(runs=2, epochs=100, dsa=False))
    acc = result["models"]["convnet"]["acc"]
    assert len(acc["runs"]) == 2
    # 20 real-initialised digits train a net far above the 10 % of chance.
    assert acc["mean"] > 30.0


def test_dm_loss_decreases(digits, tmp_path):
    distiller = make("dm", digits, iterations=30, lr_img=1.0, dsa=False)
    run_distillation(distiller, tmp_path, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("method", ["dsa", "dm"])
def test_same_seed_is_bit_identical(method, digits, tmp_path):
    a = run_distillation(make(method, digits, seed=3), tmp_path / "a", progress=False)
    b = run_distillation(make(method, digits, seed=3), tmp_path / "b", progress=False)
    c = run_distillation(make(method, digits, seed=4), tmp_path / "c", progress=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("method", ["dsa", "dm"])
def test_resume_after_a_stop_equals_an_uninterrupted_run(method, digits, tmp_path, monkeypatch):
    iterations = 4
    full = run_distillation(make(method, digits, iterations=iterations), tmp_path / "full", progress=False)

    stopped = make(method, digits, iterations=iterations)
    real_step = stopped.step

    def step_then_stop(iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return real_step(iteration)

    monkeypatch.setattr(stopped, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_distillation(stopped, tmp_path / "resumed", checkpoint_every=2, progress=False)
    resumed = run_distillation(
        make(method, digits, iterations=iterations), tmp_path / "resumed", resume=True, progress=False
    )
    assert torch.equal(full.images, resumed.images)
    iterations_logged = [
        json.loads(line)["iteration"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert iterations_logged == [1, 2, 3, 4]


def test_resume_with_other_settings_is_refused(digits, tmp_path):
    run_distillation(make("dm", digits), tmp_path, progress=False)
    with pytest.raises(FastddError, match="other settings"):
        run_distillation(make("dm", digits, lr_img=0.5), tmp_path, resume=True, progress=False)


def test_existing_run_is_not_overwritten(digits, tmp_path):
    run_distillation(make("dm", digits), tmp_path, progress=False)
    before = (tmp_path / "synset.safetensors").read_bytes()
    with pytest.raises(FastddError, match="already holds"):
        run_distillation(make("dm", digits, seed=9), tmp_path, progress=False)
    assert (tmp_path / "synset.safetensors").read_bytes() == before


def test_nan_loss_stops_and_keeps_last_checkpoint(digits, tmp_path, monkeypatch):
    distiller = make("dm", digits, iterations=4)
    real_step = distiller.step

    def step(iteration):
        metrics = real_step(iteration)
        if iteration == 2:
            with torch.no_grad():
                distiller.images.fill_(float("nan"))
            return {"loss": float("nan")}
        return metrics

    monkeypatch.setattr(distiller, "step", step)
    with pytest.raises(FastddError, match="loss became nan"):
        run_distillation(distiller, tmp_path, checkpoint_every=2, progress=False)
    saved = SyntheticSet.load(tmp_path)
    assert torch.isfinite(saved.images).all()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 2


def test_ipc_above_smallest_class(digits):
    with pytest.raises(FastddError, match="smallest class"):
        make("dm", digits, ipc=10_000)


def test_noise_init(digits, tmp_path):
    synset = run_distillation(make("dm", digits, init="noise"), tmp_path, progress=False)
    assert torch.isfinite(synset.images).all()


def test_real_images_go_to_a_gpu_once_only_when_they_fit(monkeypatch):
    from fastdd.distill.base import REAL_DATA_SHARE_OF_FREE_MEMORY, real_images_on_device

    images = torch.zeros(10, 1, 4, 4)
    assert real_images_on_device(images, torch.device("cpu")) is images
    nbytes = images.numel() * images.element_size()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(nbytes / REAL_DATA_SHARE_OF_FREE_MEMORY) - 1, 0))
    assert real_images_on_device(images, torch.device("cuda")) is images  # too large for its share: stays on the CPU
    moved = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (int(nbytes / REAL_DATA_SHARE_OF_FREE_MEMORY), 0))
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: moved.append(args) or self)
    real_images_on_device(images, torch.device("cuda"))
    assert moved == [(torch.device("cuda"),)]
