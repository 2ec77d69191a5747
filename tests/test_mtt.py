"""Trajectory-matching distillers (mtt, tesla, tesla-compat) end to end on digits with tiny settings."""

import json

import pytest
import torch

from fastdd.distill import get_distiller, run_distillation
from fastdd.distill import mtt as mtt_module
from fastdd.distill.trajectory_presets import DEFAULT_ITERATIONS, PUBLISHED, trajectory_preset
from fastdd.errors import FastddError
from fastdd.evaluate import EvalConfig, evaluate_synthetic_set

from tiny_trajectory import make_distiller


make = make_distiller


def test_mtt_and_tesla_take_the_same_steps(digits, experts, tmp_path):
    runs = {m: run_distillation(make(m, digits, experts), tmp_path / m, progress=False) for m in ("mtt", "tesla")}
    start = make("mtt", digits, experts).images.detach()
    moved = (runs["mtt"].images - start).norm()
    assert moved > 0
    # Same sampling, same gradient up to float32 rounding: the two sets agree to a tiny fraction of the update.
    assert (runs["tesla"].images - runs["mtt"].images).norm() / moved < 1e-3
    assert abs(float(runs["tesla"].syn_lr) - float(runs["mtt"].syn_lr)) < 1e-6
    compat = run_distillation(make("tesla-compat", digits, experts), tmp_path / "compat", progress=False)
    assert not torch.equal(compat.images, runs["tesla"].images)


def test_synset_carries_learned_lr_used_by_evaluation(digits, experts, tmp_path):
    synset = run_distillation(make("tesla", digits, experts), tmp_path, progress=False)
    meta = json.loads((tmp_path / "synset.json").read_text())
    assert meta["method"] == "tesla" and meta["mode"] == "exact"
    assert synset.syn_lr is not None and float(synset.syn_lr) > 0
    result = evaluate_synthetic_set(synset, digits, models=["convnet"], config=EvalConfig(runs=1, epochs=2))
    assert result["lr"] == pytest.approx(float(synset.syn_lr))


def test_resume_equals_uninterrupted(digits, experts, tmp_path):
    full = run_distillation(make("tesla", digits, experts, iterations=4), tmp_path / "full", progress=False)
    run_distillation(make("tesla", digits, experts, iterations=2), tmp_path / "resumed", progress=False)
    resumed = run_distillation(
        make("tesla", digits, experts, iterations=4), tmp_path / "resumed", resume=True, progress=False
    )
    assert torch.equal(full.images, resumed.images)
    assert torch.equal(full.syn_lr, resumed.syn_lr)


def test_soft_labels_are_computed_only_for_used_images(digits, experts, tmp_path, monkeypatch):
    computed = []
    original = mtt_module.TrajectoryMatching.soft_targets

    def spy(self, params, images):
        computed.append(images.shape[0])
        return original(self, params, images)

    monkeypatch.setattr(mtt_module.TrajectoryMatching, "soft_targets", spy)
    distiller = make("tesla", digits, experts, soft_labels=True, batch_syn=3, syn_steps=2, iterations=1)
    synset = run_distillation(distiller, tmp_path, progress=False)
    # one iteration, two steps of three images: at most six rows during distillation, then all 20 for the saved set
    assert sum(computed[:-1]) <= 6 and computed[-1] == 20
    assert synset.soft_labels.shape == (20, 10)
    assert torch.allclose(synset.soft_labels.sum(dim=1), torch.ones(20))


def test_students_average(digits, experts, tmp_path):
    one = run_distillation(make("tesla", digits, experts), tmp_path / "one", progress=False)
    two = run_distillation(make("tesla", digits, experts, students=2), tmp_path / "two", progress=False)
    assert torch.isfinite(two.images).all() and not torch.equal(one.images, two.images)


def test_kept_graphs_give_the_same_set(digits, experts, tmp_path):
    recomputed = run_distillation(make("tesla", digits, experts), tmp_path / "recomputed", progress=False)
    kept = run_distillation(make("tesla", digits, experts, keep_graphs=2), tmp_path / "kept", progress=False)
    torch.testing.assert_close(kept.images, recomputed.images, rtol=1e-5, atol=1e-6)
    with pytest.raises(FastddError, match="--keep-graphs applies to tesla"):
        make("mtt", digits, experts, keep_graphs=2)


def test_kept_graphs_refuse_row_splitting(digits, experts, monkeypatch):
    # One student on two processes splits every minibatch's rows, which the kept graphs do not support.
    distiller = make("tesla", digits, experts, keep_graphs=2)
    monkeypatch.setattr(mtt_module.distributed, "world_size", lambda: 2)
    with pytest.raises(FastddError, match="--keep-graphs does not combine with splitting"):
        distiller.step(0)


def test_non_positive_lr_stops_and_keeps_checkpoint(digits, experts, tmp_path, monkeypatch):
    distiller = make("tesla", digits, experts, iterations=4)
    real = mtt_module.match_gradients

    def huge_lr_gradient(*args, **kwargs):
        loss, g_img, g_lr = real(*args, **kwargs)
        if distiller_iterations[0] >= 2:
            g_lr = torch.full_like(g_lr, 1e12)
        distiller_iterations[0] += 1
        return loss, g_img, g_lr

    distiller_iterations = [0]
    monkeypatch.setattr(mtt_module, "match_gradients", huge_lr_gradient)
    with pytest.raises(FastddError, match="learned student learning rate"):
        run_distillation(distiller, tmp_path, checkpoint_every=2, progress=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["iteration"] == 2 and float(saved["distiller"]["syn_lr"]) > 0


def test_experts_of_another_model_are_refused(digits, experts, tmp_path):
    distiller = make("tesla", digits, experts, width=16)
    with pytest.raises(FastddError, match="width"):
        run_distillation(distiller, tmp_path, progress=False)


def test_presets():
    assert trajectory_preset("cifar10", 10) == {"iterations": DEFAULT_ITERATIONS, **PUBLISHED[("cifar10", 10)]}
    borrowed = trajectory_preset("fashion-mnist", 10)
    assert borrowed["zca"] is False and borrowed["syn_steps"] == PUBLISHED[("cifar10", 10)]["syn_steps"]
    assert trajectory_preset("cifar100", 20)["syn_steps"] == PUBLISHED[("cifar100", 10)]["syn_steps"]
    cfg = get_distiller("tesla").config_class(dataset="cifar100", ipc=50, syn_steps=7).resolved()
    assert cfg.syn_steps == 7 and cfg.batch_syn == 125 and cfg.zca is True
    assert cfg.iterations == DEFAULT_ITERATIONS


def test_digits_default_run_is_short_and_flags_win():
    tesla = get_distiller("tesla").config_class
    assert tesla(dataset="digits", ipc=10).resolved().iterations == 200
    assert tesla(dataset="digits", ipc=10, iterations=7).resolved().iterations == 7
    assert tesla(dataset="fashion-mnist", ipc=10).resolved().iterations == DEFAULT_ITERATIONS
