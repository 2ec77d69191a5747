"""The group-robust authors' network schedule for dc/dsa (``--robust-schedule official``): what the network trains on
between image updates, how many steps, and that it works with and without --robust, from the library and the CLI."""

import math

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config import ConfigError
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.distill.dc import OFFICIAL_LOOPS
from fastdd.distill.draws import draw_generator

TINY = dict(ipc=2, iterations=1, width=8, batch_real=6, batch_train=16, robust_schedule="official")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(method, digits, **overrides):
    cls = get_distiller(method)
    return cls(cls.config_class.from_options({**TINY, **overrides}, method=method), digits)


def record_network_batches(distiller):
    """Wrap the plug-ins' network loss so that every network step's (images, labels) is kept, in order."""
    seen = []
    inner = distiller.plugins.network_loss

    def spy(net, real, labels, *rest):
        seen.append((real.detach().clone(), labels.clone()))
        return inner(net, real, labels, *rest)

    distiller.plugins.network_loss = spy
    return seen


def test_official_defaults(digits):
    distiller = make("dsa", digits)
    assert (distiller.outer_loop, distiller.inner_loop) == OFFICIAL_LOOPS == (2, 2)
    assert distiller.net_data == "real"
    given = make("dsa", digits, outer_loop=3, inner_loop=1)
    assert (given.outer_loop, given.inner_loop) == (3, 1)


def test_one_epoch_is_the_matched_batches_plus_fresh_real_batches(digits):
    """dc (no augmentation): one epoch's minibatches, put together, are exactly every class's matched real batch of
    outer step 0 and a fresh batch drawn from ("net_real", iteration, 0, class), each image once."""
    distiller = make("dc", digits, inner_loop=1, iterations=1)
    seen = record_network_batches(distiller)
    distiller.step(3)
    batches = 2 * 10 * 6
    assert len(seen) == math.ceil(batches / 16) and [len(x) for x, _ in seen[:-1]] == [16] * (len(seen) - 1)
    images = torch.cat([x for x, _ in seen])
    labels = torch.cat([y for _, y in seen])
    index = digits.class_index()
    expected, expected_labels = [], []
    for c in range(10):
        matched = digits.train_images[index.sample(c, 6, draw_generator(0, "real", 3, 0, c))]
        fresh = digits.train_images[index.sample(c, 6, draw_generator(0, "net_real", 3, 0, c))]
        expected += [matched, fresh]
        expected_labels.append(torch.full((12,), c))
    expected, expected_labels = torch.cat(expected), torch.cat(expected_labels)

    def canonical(x, y):
        rows = torch.cat([y[:, None].to(x.dtype), x.flatten(1)], dim=1)
        key = rows @ torch.randn(rows.shape[1], generator=torch.Generator().manual_seed(1), dtype=rows.dtype)
        return rows[torch.argsort(key)]

    assert torch.equal(canonical(images, labels), canonical(expected, expected_labels))


def test_dsa_augments_the_matched_batch_and_every_minibatch(digits):
    """dsa: the minibatches are not the stored images (augmented again per image); the step count is inner_loop
    epochs of ceil(2 * batch_real * classes / batch_train) steps."""
    distiller = make("dsa", digits)
    seen = record_network_batches(distiller)
    distiller.step(0)
    assert len(seen) == 2 * math.ceil(2 * 10 * 6 / 16)
    stored = digits.train_images.flatten(1)
    first = seen[0][0].flatten(1)
    exact = (torch.cdist(first, stored).min(dim=1).values < 1e-6).float().mean()
    assert exact < 0.5  # most images were transformed (a flip or a tiny crop may leave a few exact)


def test_official_schedule_with_robust_uses_the_robust_loss(digits):
    """With --robust the official schedule's network loss is the group-robust one (larger than CE on the same
    batch at initialisation), and without it plain cross-entropy."""
    plain, robust = make("dsa", digits), make("dsa", digits, robust=True)
    assert plain.step(0)["net_loss"] < robust.step(0)["net_loss"] - 0.5


def test_official_schedule_changes_the_result_and_is_reproducible(digits, tmp_path):
    official = run_distillation(make("dsa", digits), tmp_path / "a", progress=False)
    again = run_distillation(make("dsa", digits), tmp_path / "b", progress=False)
    fastdd_schedule = run_distillation(
        make("dsa", digits, robust_schedule="fastdd", net_data="real", outer_loop=2, inner_loop=2, robust_batch=6),
        tmp_path / "c", progress=False,
    )
    assert torch.equal(official.images, again.images)
    assert not torch.equal(official.images, fastdd_schedule.images)
    assert official.meta["hyperparameters"]["robust_schedule"] == "official"


def test_official_schedule_refuses_synthetic_network_data(digits):
    with pytest.raises(ConfigError, match="--robust-schedule official"):
        make("dsa", digits, net_data="synthetic")


def test_cli_robust_schedule(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "distill", "--method", "dsa", "--ipc", "1", "--iterations", "1", "--width", "8", "--batch-real", "4",
        "--robust-schedule", "official", "--robust", "--cvar-tail", "lower", "--robust-assign", "all",
        "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert (out / "synset.safetensors").exists()
    bad = CliRunner().invoke(app, [
        "distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--robust-schedule", "official",
        "--out", str(tmp_path / "dm"),
    ])
    assert bad.exit_code != 0 and "--robust-schedule" in bad.output and "Traceback" not in bad.output
