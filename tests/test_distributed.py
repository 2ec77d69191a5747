"""Two Gloo processes on this CPU give the single-process result: dm, dsa (classes split), tesla (students split),
tesla and tesla-compat with one student (minibatch rows split), experts (experts split), a resumed run, and the
`--nproc` launcher of the command line.

The two processes are started once per module (starting them costs seconds) and run every scenario; the tests
then compare their outputs with single-process runs made here with the same seeds.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.distill import distributed, get_distiller, run_distillation
from fastdd.distill.experts import ExpertConfig, train_experts
from fastdd.errors import FastddError
from fastdd.io import SyntheticSet

NPROC = 2
# rtol / atol for sums taken in another order. On this CPU dm, dsa, tesla with 2 students, the resumed run and the
# experts come out bit-identical; tesla with 3 students (rank 0 adds students 0 and 2) differs in the last bit.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
TINY = {
    "dm": dict(ipc=2, iterations=3, width=32, batch_real=16),
    # MDT and TrustDD outliers on, so the draws of the classes and outlier group a rank skips are covered too.
    "dsa": dict(ipc=2, iterations=2, width=16, batch_real=16, outer_loop=2, inner_loop=1, mdt=True, outliers="poe"),
    "tesla": dict(ipc=2, iterations=2, width=8, syn_steps=3, expert_epochs=1, max_start_epoch=2, lr_img=10.0,
                  lr_lr=1e-5),
}
TINY["tesla-compat"] = TINY["tesla"]
EXPERTS = dict(dataset="digits", width=8, num_experts=2, epochs=3, seed=5)
EXPERTS_POE = dict(EXPERTS, outliers="poe")  # TrustDD students need experts trained with outliers
# --students 1 on 2 processes: each student's minibatch rows are split (folder: method, experts folder, options).
# batch_syn 7 gives shares of 4 and 3 rows whose outlier counts differ from the minibatch's.
ROW_SPLIT = {
    "tesla_rows": ("tesla", "experts", dict(seed=4)),
    "tesla_rows_mdt_poe": ("tesla", "experts_poe", dict(seed=6, mdt=True, outliers="poe", batch_syn=7)),
    "compat_rows": ("tesla-compat", "experts", dict(seed=4)),
    "compat_rows_mdt_poe": ("tesla-compat", "experts_poe", dict(seed=6, mdt=True, outliers="poe", batch_syn=7)),
}

# --student-batching grouped with 3 students, TrustDD outliers and MDT masks (against one process, sequential).
GROUPED = dict(seed=7, students=3, student_batching="grouped", mdt=True, outliers="poe", batch_syn=7)


def make(method, digits, **overrides):
    cls = get_distiller(method)
    return cls(cls.config_class.from_options({**TINY[method], **overrides}, method=method), digits)


def _scenarios(root: str) -> None:
    """Run in each of the two processes: every distributed scenario, outputs under ``root``."""
    root = Path(root)
    with distributed.session("cpu"):
        assert distributed.world_size() == NPROC
        digits = load_dataset("digits")
        run_distillation(make("dm", digits, seed=1), root / "dm", progress=False)
        run_distillation(make("dm", digits, seed=3, outliers="poe"), root / "dm_poe", progress=False)
        run_distillation(make("dsa", digits, seed=2), root / "dsa", progress=False)
        train_experts(ExpertConfig(**EXPERTS), digits, root / "experts", progress=False)
        for students in (2, 3):
            run_distillation(
                make("tesla", digits, students=students, experts=str(root / "experts")),
                root / f"tesla{students}",
                progress=False,
            )
        train_experts(ExpertConfig(**EXPERTS_POE), digits, root / "experts_poe", progress=False)
        for folder, (method, experts, options) in ROW_SPLIT.items():
            distiller = make(method, digits, experts=str(root / experts), **options)
            assert distiller.splits_rows()
            run_distillation(distiller, root / folder, progress=False)
        # Grouped students: rank 0 computes students 0 and 2 as one network, rank 1 student 1.
        run_distillation(make("tesla", digits, experts=str(root / "experts_poe"), **GROUPED), root / "grouped",
                         progress=False)
        # Resume: two iterations, then all ranks continue from rank 0's checkpoint to four.
        run_distillation(make("dm", digits, iterations=2), root / "resumed", progress=False)
        run_distillation(make("dm", digits, iterations=4), root / "resumed", resume=True, progress=False)
        run_distillation(make("dm", digits, iterations=2), root / "half", progress=False)  # resumed by one process
        # dm with batchnorm normalises over all classes at once: refused, on every rank, before any collective.
        try:
            make("dm", digits, norm="batchnorm").step(0)
        except FastddError as exc:
            (root / f"batchnorm_refused_{distributed.rank()}.txt").write_text(str(exc))
        # tesla's rows with batchnorm are not independent: refused, on every rank, before any collective.
        try:
            make("tesla", digits, norm="batchnorm").step(0)
        except FastddError as exc:
            (root / f"tesla_batchnorm_refused_{distributed.rank()}.txt").write_text(str(exc))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    distributed.launch(_scenarios, (str(root),), nproc=NPROC, threads=1)
    return root


@pytest.fixture(scope="module")
def single_experts(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single_experts")
    train_experts(ExpertConfig(**EXPERTS), digits, folder, progress=False)
    return folder


def assert_same_synset(distributed_set: SyntheticSet, single: SyntheticSet, start: torch.Tensor) -> None:
    assert (single.images - start).abs().max() > 1e-3, "the images never moved: the comparison would be empty"
    torch.testing.assert_close(distributed_set.images, single.images, **TOLERANCE)
    assert torch.equal(distributed_set.labels, single.labels)


@pytest.mark.parametrize("folder, method, options", [
    ("dm", "dm", dict(seed=1)), ("dm_poe", "dm", dict(seed=3, outliers="poe")), ("dsa", "dsa", dict(seed=2)),
])
def test_classes_split_over_two_processes_equal_one_process(folder, method, options, digits, two_processes, tmp_path):
    single = make(method, digits, **options)
    start = single.images.detach().clone()
    expected = run_distillation(single, tmp_path, progress=False)
    got = SyntheticSet.load(two_processes / folder)
    assert_same_synset(got, expected, start)
    if expected.outlier_images is not None:
        torch.testing.assert_close(got.outlier_images, expected.outlier_images, **TOLERANCE)
    # rank 0 alone wrote the run: one metrics line per iteration, with the loss summed over all classes
    records = [json.loads(line) for line in (two_processes / folder / "metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, TINY[method]["iterations"] + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single_records], rel=1e-5)


def test_experts_split_over_two_processes_equal_one_process(two_processes, single_experts):
    folder = two_processes / "experts"
    names = sorted(p.name for p in folder.glob("expert_*.safetensors"))
    assert names == ["expert_0000.safetensors", "expert_0001.safetensors"]
    for name in names:  # same seeds per expert, no sums: the files are byte for byte the same
        assert (folder / name).read_bytes() == (single_experts / name).read_bytes(), name
    assert json.loads((folder / "experts.json").read_text()) == json.loads(
        (single_experts / "experts.json").read_text()
    )
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("students", [2, 3])
def test_tesla_students_split_over_two_processes_equal_one_process(students, digits, two_processes, single_experts,
                                                                   tmp_path):
    single = make("tesla", digits, students=students, experts=str(single_experts))
    start = single.images.detach().clone()
    expected = run_distillation(single, tmp_path, progress=False)
    got = SyntheticSet.load(two_processes / f"tesla{students}")
    assert_same_synset(got, expected, start)
    torch.testing.assert_close(got.syn_lr, expected.syn_lr, **TOLERANCE)


def test_grouped_students_over_two_processes_equal_one_process_sequential(digits, two_processes, single_poe_experts,
                                                                          tmp_path):
    single = make("tesla", digits, experts=str(single_poe_experts), **{**GROUPED, "student_batching": "sequential"})
    start = single.images.detach().clone()
    expected = run_distillation(single, tmp_path, progress=False)
    got = SyntheticSet.load(two_processes / "grouped")
    assert_same_synset(got, expected, start)
    torch.testing.assert_close(got.syn_lr, expected.syn_lr, **TOLERANCE)
    torch.testing.assert_close(got.outlier_images, expected.outlier_images, **TOLERANCE)


@pytest.fixture(scope="module")
def single_poe_experts(digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single_poe_experts")
    train_experts(ExpertConfig(**EXPERTS_POE), digits, folder, progress=False)
    return folder


@pytest.mark.parametrize("folder", list(ROW_SPLIT))
def test_one_student_rows_split_over_two_processes_equal_one_process(folder, digits, two_processes, single_experts,
                                                                     single_poe_experts, tmp_path):
    method, experts, options = ROW_SPLIT[folder]
    experts = single_poe_experts if experts == "experts_poe" else single_experts
    single = make(method, digits, experts=str(experts), **options)
    assert not single.splits_rows()
    start = single.images.detach().clone()
    expected = run_distillation(single, tmp_path, progress=False)
    got = SyntheticSet.load(two_processes / folder)
    assert_same_synset(got, expected, start)
    torch.testing.assert_close(got.syn_lr, expected.syn_lr, **TOLERANCE)
    if expected.outlier_images is not None:
        torch.testing.assert_close(got.outlier_images, expected.outlier_images, **TOLERANCE)
    records = [json.loads(line) for line in (two_processes / folder / "metrics.jsonl").read_text().splitlines()]
    single_records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single_records], rel=1e-5)


def test_tesla_row_split_with_batchnorm_is_refused_on_every_rank(two_processes):
    for rank in range(NPROC):
        message = (two_processes / f"tesla_batchnorm_refused_{rank}.txt").read_text()
        assert "batchnorm" in message and "one process" in message and "--students" in message


def test_resume_in_two_processes_equals_uninterrupted_single_run(digits, two_processes, tmp_path):
    single = make("dm", digits, iterations=4)
    start = single.images.detach().clone()
    expected = run_distillation(single, tmp_path, progress=False)
    folder = two_processes / "resumed"
    assert_same_synset(SyntheticSet.load(folder), expected, start)
    iterations = [json.loads(line)["iteration"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert iterations == [1, 2, 3, 4]
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["iteration"] == 4


def test_one_process_resumes_a_two_process_checkpoint(digits, two_processes, tmp_path):
    expected = run_distillation(make("dm", digits, iterations=4), tmp_path / "full", progress=False)
    folder = tmp_path / "half"
    shutil.copytree(two_processes / "half", folder)
    resumed = run_distillation(make("dm", digits, iterations=4), folder, resume=True, progress=False)
    torch.testing.assert_close(resumed.images, expected.images, **TOLERANCE)


def test_dm_with_batchnorm_is_refused_on_every_rank(two_processes):
    for rank in range(NPROC):
        message = (two_processes / f"batchnorm_refused_{rank}.txt").read_text()
        assert "batchnorm" in message and "one process" in message


runner = CliRunner()
CLI_DM = ["distill", "--method", "dm", "--ipc", "2", "--iterations", "2", "--width", "16", "--batch-real", "16",
          "--quiet"]


def test_cli_nproc_starts_processes_with_the_single_process_result(tmp_path):
    single = runner.invoke(app, [*CLI_DM, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    # `fastdd --nproc 2 distill ...`: the global form; the command form `distill ... --nproc 2` is the same option.
    two = runner.invoke(app, ["--nproc", "2", *CLI_DM, "--out", str(tmp_path / "two")])
    assert two.exit_code == 0, two.output
    torch.testing.assert_close(
        SyntheticSet.load(tmp_path / "two").images, SyntheticSet.load(tmp_path / "one").images, **TOLERANCE
    )


def test_cli_nproc_errors(tmp_path, monkeypatch):
    result = runner.invoke(app, ["--nproc", "2", "show", str(tmp_path)])
    assert result.exit_code == 2 and "--nproc applies to distill and experts" in result.stderr
    result = runner.invoke(app, [*CLI_DM, "--out", str(tmp_path / "a"), "--nproc", "0"])
    assert result.exit_code == 2 and "--nproc must be at least 1" in result.stderr
    # Under torchrun (WORLD_SIZE set), a different --nproc is a mistake.
    monkeypatch.setenv("WORLD_SIZE", "4")
    result = runner.invoke(app, [*CLI_DM, "--out", str(tmp_path / "b"), "--nproc", "2"])
    assert result.exit_code == 2 and "torchrun" in result.stderr
    assert not (tmp_path / "b").exists()
