"""TensorBoard / W&B sinks: the same scalars as metrics.jsonl, image grids every K iterations, resume without
duplicated steps, and one sentence when the optional package is missing."""

import json
import sys
import types

import numpy as np
import pytest
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.observability import numeric_scalars

from cli_errors import assert_one_sentence_error

runner = CliRunner()
TINY = ["--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def assert_scalars_equal_records(events, metrics, step_field):
    """Every numeric field of every record is a scalar tagged with its name at the record's step, and nothing else."""
    expected = {}
    for record in metrics:
        for tag, value in numeric_scalars(record).items():
            expected.setdefault(tag, []).append((record[step_field], np.float32(value)))
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        assert [(e.step, np.float32(e.value)) for e in events.Scalars(tag)] == points, tag


def test_distill_tensorboard_scalars_and_image_grids(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    result = invoke(
        "distill", *TINY, "--iterations", 3, "--outliers", "poe", "--out", out, "--tensorboard", "--log-images-every", 2
    )
    assert result.exit_code == 0, result.output
    metrics = records(out / "metrics.jsonl")
    assert [r["iteration"] for r in metrics] == [1, 2, 3]
    events = read_events(out / "tensorboard")
    assert_scalars_equal_records(events, metrics, "iteration")
    assert {"loss", "seconds"} <= set(events.Tags()["scalars"])
    assert sorted(events.Tags()["images"]) == ["synset", "synset_outliers"]
    for name in ("synset", "synset_outliers"):
        assert [image.step for image in events.Images(name)] == [2, 3]  # every 2 iterations, and the last


def test_resume_continues_the_steps_without_duplicates(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    digits = load_dataset("digits")

    def make():
        cls = get_distiller("dm")
        return cls(cls.config_class.from_options(dict(ipc=1, iterations=4, width=8, batch_real=16), method="dm"), digits)

    stopped = make()
    real_step = stopped.step

    def step_then_stop(iteration):
        if iteration == 3:  # steps 1-3 are logged, the checkpoint holds 2
            raise KeyboardInterrupt
        return real_step(iteration)

    monkeypatch.setattr(stopped, "step", step_then_stop)
    board = tmp_path / "board"
    with pytest.raises(KeyboardInterrupt):
        run_distillation(stopped, tmp_path, checkpoint_every=2, progress=False, tensorboard=board)
    run_distillation(make(), tmp_path, resume=True, progress=False, tensorboard=board, log_images_every=3)
    assert len(list(board.glob("events.out.tfevents.*"))) == 2
    metrics = records(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in metrics] == [1, 2, 3, 4]
    events = read_events(board)
    assert_scalars_equal_records(events, metrics, "iteration")  # step 3 shows once, with the resumed run's values
    assert [image.step for image in events.Images("synset")] == [3, 4]


def test_experts_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "experts"
    result = invoke("experts", "--num-experts", 1, "--epochs", 2, "--width", 8, "--out", out, "--quiet", "--tensorboard")
    assert result.exit_code == 0, result.output
    metrics = records(out / "metrics.jsonl")
    events = read_events(out / "tensorboard" / "expert_0000")
    epochs = [r for r in metrics if "epoch" in r]
    assert_scalars_equal_records(events, epochs + [{**metrics[-1], "epoch": 2}], "epoch")
    assert [e.step for e in events.Scalars("test_accuracy")] == [2]



def test_missing_packages_fail_in_one_sentence_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    out = tmp_path / "run"
    assert_one_sentence_error(invoke("distill", *TINY, "--out", out, "--tensorboard"), "pip install tensorboard")
    assert_one_sentence_error(invoke("distill", *TINY, "--out", out, "--tensorboard-dir", tmp_path / "tb"),
                              "pip install tensorboard")
    assert_one_sentence_error(invoke("distill", *TINY, "--out", out, "--wandb"), "pip install wandb")
    assert_one_sentence_error(invoke("experts", "--out", tmp_path / "e", "--tensorboard"), "pip install tensorboard")
    assert not out.exists() and not (tmp_path / "e").exists()
    assert_one_sentence_error(invoke("distill", *TINY, "--out", out, "--log-images-every", 0), "--log-images-every")


def fake_wandb():
    """A stand-in for the wandb package that records init, log and finish calls."""
    module = types.ModuleType("wandb")
    module.runs = []

    class Image:
        def __init__(self, data):
            self.data = data

    class Run:
        def __init__(self, **kwargs):
            self.init, self.logged, self.finished = kwargs, [], False
            module.runs.append(self)

        def log(self, data, step=None):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    module.Image = Image
    module.init = lambda **kwargs: Run(**kwargs)
    return module


def test_wandb_gets_the_same_scalars_and_images(tmp_path, monkeypatch):
    wandb = fake_wandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    result = invoke("distill", *TINY, "--iterations", 3, "--out", out, "--wandb", "--log-images-every", 2)
    assert result.exit_code == 0, result.output
    (run,) = wandb.runs
    assert run.finished and run.init["mode"] == "offline" and run.init["name"] == "run"
    assert run.init["config"]["ipc"] == 1
    scalars = [(step, data) for step, data in run.logged if "synset" not in data]
    assert scalars == [(r["iteration"], numeric_scalars(r)) for r in records(out / "metrics.jsonl")]
    images = [(step, data["synset"].data) for step, data in run.logged if "synset" in data]
    assert [step for step, _ in images] == [2, 3]
    assert images[0][1].dtype == np.uint8 and images[0][1].shape[:2] == (10 * 66 + 2, 66 + 2)  # 10 x 1 images of 64 px

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert invoke("experts", "--num-experts", 1, "--epochs", 1, "--width", 8, "--out", tmp_path / "e", "--quiet",
                  "--wandb").exit_code == 0
    expert_run = wandb.runs[1]
    assert expert_run.init["mode"] == "disabled" and expert_run.init["group"] == "e"
    assert [step for step, _ in expert_run.logged] == [1, 1]  # epoch 1, then test_accuracy at the last epoch
    assert set(expert_run.logged[0][1]) == {"loss", "seconds"} and set(expert_run.logged[1][1]) == {"test_accuracy"}
