"""OAL as its authors' code runs it (``--oal-recipe authors``), the MICL weight (``--oal-beta``), a full-data teacher
(``fastdd teacher``) and evaluation networks that fine-tune a trained one (``--init``)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config.evaluate import EvalConfig, EvaluationSettings
from fastdd.config.teacher import TeacherConfig
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate.plan import plan_evaluation
from fastdd.evaluate.protocol import train_on_synthetic
from fastdd.models import build_model
from fastdd.network_files import NETWORK_META, NETWORK_TENSORS, load_network
from fastdd.teacher_job import train_teacher
from fastdd.training import accuracy
from fastdd.trust.boundary_outliers import boundary_outliers, per_class_boundary_outliers
from fastdd.trust.oal import AUTHORS_CLUB_LR, AUTHORS_OUTLIERS_PER_CLASS, OutlierBank
from fastdd.trust.teacher import load_teacher
from real_synsets import real_image_synset


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_per_class_outliers_are_each_class_search_scaled_to_its_mean_norm():
    g = seeded(0)
    features = torch.rand(60, 6, generator=g, dtype=torch.float64) + 0.5
    labels = torch.arange(3).repeat_interleave(20)
    options = dict(k=4, num_anchors=5, samples_per_anchor=9, keep=2, sigma=0.07)
    got = per_class_boundary_outliers(features, labels, num_classes=3, generator=seeded(1), count=25, **options)
    assert got.shape == (75, 6)
    replay = seeded(1)
    for c in range(3):
        members = features[labels == c]
        rounds = [boundary_outliers(members, generator=replay, **options) for _ in range(3)]  # 3 x 10 >= 25
        expected = torch.cat(rounds)[:25] * members.mean(dim=0).norm()
        torch.testing.assert_close(got[25 * c : 25 * (c + 1)], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="class 2"):
        per_class_boundary_outliers(features[:41], labels[:41], num_classes=3, generator=seeded(1), count=5)


def _nets():
    g = seeded(0)
    teacher = build_model("convnet", channels=1, num_classes=3, image_size=8, width=8, generator=g)
    teacher.eval().requires_grad_(False)
    student = build_model("convnet", channels=1, num_classes=3, image_size=8, width=4, generator=g)
    return teacher, student


def _authors_objective(teacher, student, **options):
    g = seeded(7)
    images, labels = torch.randn(45, 1, 8, 8, generator=g), torch.arange(3).repeat(15)
    bank = OutlierBank.from_real(teacher, images, labels, num_classes=3, generator=seeded(8), per_class=15,
                                 recipe="authors", club_hidden=16, **options)
    return bank.objective(student, generator=seeded(9))


def test_the_authors_recipe_builds_their_parts():
    teacher, student = _nets()
    objective = _authors_objective(teacher, student)
    assert objective.outliers.shape == (3 * AUTHORS_OUTLIERS_PER_CLASS, teacher.feature_dim)
    kinds = [type(m).__name__ for m in objective.phi]
    assert kinds == ["BatchNorm1d", "Linear", "ReLU", "BatchNorm1d"]
    assert objective.proj is None and objective.club.x_dim == teacher.feature_dim
    groups = objective.parameter_groups(0.01)
    assert [g["lr"] for g in groups] == [0.01, AUTHORS_CLUB_LR]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in objective.club.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in objective.phi.parameters()}


def test_the_authors_q_learns_from_the_loss_not_from_its_own_steps():
    teacher, student = _nets()
    objective = _authors_objective(teacher, student)
    before = [p.clone() for p in objective.club.parameters()]
    x, y = torch.randn(8, 1, 8, 8, generator=seeded(3)), torch.arange(3).repeat(3)[:8]
    loss = objective(student.train(), x, y, seeded(4))
    assert all(torch.equal(a, b) for a, b in zip(before, objective.club.parameters()))  # no steps inside the call
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.club.parameters())
    assert {"micl", "q_nll"} <= set(objective.last_parts)


def test_the_evaluation_optimiser_trains_q_at_the_authors_rate():
    teacher, student = _nets()
    objective = _authors_objective(teacher, student)
    before = [p.clone() for p in objective.club.parameters()]
    images, labels = torch.randn(12, 1, 8, 8, generator=seeded(5)), torch.arange(3).repeat(4)
    train_on_synthetic(images, labels, student, config=EvalConfig(epochs=1, batch_size=12), lr=0.01,
                       generator=seeded(6), dsa_strategy=None, objective=objective)
    moved = [float((a - b).detach().abs().max()) for a, b in zip(before, objective.club.parameters())]
    assert max(moved) > 0


def test_beta_zero_is_idkd_only():
    teacher, student = _nets()
    objective = _authors_objective(teacher, student, beta=0.0)
    x, y = torch.randn(8, 1, 8, 8, generator=seeded(3)), torch.arange(3).repeat(3)[:8]
    objective(student.train(), x, y, seeded(4))
    assert set(objective.last_parts) == {"ce", "kl_logits", "kl_features", "total"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "net"
    config = TeacherConfig(epochs=2, width=16, out=str(out), quiet=True)
    net, meta = train_teacher(config)
    return out, net, meta


def test_teacher_writes_a_network_folder_that_loads_back(digits, teacher_folder):
    out, net, meta = teacher_folder
    assert (out / NETWORK_TENSORS).is_file() and (out / NETWORK_META).is_file()
    loaded, read = load_network(out)
    assert read["width"] == 16 and read["dataset"] == "digits" and read["image_shape"] == [1, 8, 8]
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    assert 100 * accuracy(loaded, digits.test_images, digits.test_labels) == pytest.approx(meta["test_accuracy"])
    assert meta["test_accuracy"] > 50


def test_teacher_folder_is_a_teacher(digits, teacher_folder):
    out, net, _ = teacher_folder
    synset = real_image_synset(digits, ipc=2)
    shape = type("Shape", (), dict(channels=1, num_classes=10, image_size=(8, 8)))
    loaded = load_teacher(str(out), synset_meta=synset.meta, shape=shape)
    assert not loaded.training and all(not p.requires_grad for p in loaded.parameters())
    with pytest.raises(FastddError, match="mean"):
        load_teacher(str(out), synset_meta={**synset.meta, "mean": [0.3]}, shape=shape)


def test_init_starts_every_network_from_the_given_one(digits, teacher_folder):
    """With a learning rate of ~0 the evaluation networks stay the --init network: same test accuracy."""
    out, net, meta = teacher_folder
    synset = real_image_synset(digits, ipc=2)
    synset.meta["hyperparameters"] = {"width": 16}
    synset.meta["model"] = "convnet"
    settings = EvaluationSettings(runs=2, epochs=1, lr=1e-12, init=str(out))
    result = plan_evaluation(synset, digits, settings).run()
    runs = result["models"]["convnet"]["acc"]["runs"]
    assert runs == pytest.approx([meta["test_accuracy"]] * 2, abs=1e-9) and result["init"] == str(out)
    fresh = plan_evaluation(synset, digits, EvaluationSettings(runs=1, epochs=1, lr=1e-12)).run()
    assert fresh["models"]["convnet"]["acc"]["mean"] < 50  # random weights: the init did the work


def test_init_of_another_architecture_is_refused(digits, teacher_folder):
    out, _, _ = teacher_folder
    synset = real_image_synset(digits, ipc=2)  # evaluated at the default width 128
    with pytest.raises(FastddError, match="--init .* does not fit the evaluation's convnet .*shape"):
        plan_evaluation(synset, digits, EvaluationSettings(runs=1, epochs=1, init=str(out)))


def test_command_line_teacher_init_and_the_authors_oal(tmp_path, digits):
    runner = CliRunner()
    teacher = tmp_path / "teacher"
    result = runner.invoke(app, ["teacher", "--epochs", "1", "--width", "8", "--out", str(teacher), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output and (teacher / NETWORK_META).is_file()
    again = runner.invoke(app, ["teacher", "--epochs", "1", "--out", str(teacher)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    run = tmp_path / "set"
    tiny = ["--width", "8", "--batch-real", "16", "--iterations", "1", "--quiet"]
    assert runner.invoke(app, ["distill", "--method", "dm", "--ipc", "2", "--out", str(run), *tiny]).exit_code == 0
    report = tmp_path / "eval.json"
    result = runner.invoke(app, [
        "evaluate", str(run), "--runs", "1", "--epochs", "1", "--train-plugin", "oal", "--teacher", str(teacher),
        "--oal-recipe", "authors", "--oal-kl", "teacher-student", "--oal-beta", "0.05", "--init", str(teacher),
        "--ood", "gaussian", "--json", str(report), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["oal_recipe"], data["oal_beta"], data["init"]) == ("authors", 0.05, str(teacher))
    bad = runner.invoke(app, ["evaluate", str(run), "--oal-recipe", "authors"])
    assert bad.exit_code != 0 and "--oal-recipe only applies with --train-plugin oal" in bad.output
