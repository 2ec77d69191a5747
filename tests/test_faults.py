"""Faults: checksummed checkpoints with a previous one to fall back on, a real SIGKILL mid-run, death at every step of
a checkpoint write, pre-flight checks of the output folder, and a full disk in the middle of a run.

Every run is dm on the embedded digits set with tiny settings (milliseconds per iteration)."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fastdd import io as io_module
from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.distill import runner as runner_module
from fastdd.errors import FastddError, FastddWarning
from fastdd.io import SyntheticSet, load_checkpoint

from cli_errors import assert_one_sentence_error

REPO = Path(__file__).resolve().parents[1]
TINY = dict(ipc=2, iterations=6, width=32, batch_real=16, seed=3)
EVERY = 2  # checkpoints at iterations 2, 4 and the final 6
cli = CliRunner()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def full(digits, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal bit for bit."""
    return run_distillation(make(digits), tmp_path_factory.mktemp("full"), checkpoint_every=EVERY, progress=False)


def make(digits, **overrides):
    cls = get_distiller("dm")
    return cls(cls.config_class.from_options({**TINY, **overrides}, method="dm"), digits)


def same_synset(a: SyntheticSet, b: SyntheticSet) -> bool:
    pairs = [(a.images, b.images), (a.labels, b.labels)]
    for name in ("syn_lr", "outlier_images", "soft_labels"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            pairs.append((x, y))
    return all(torch.equal(x, y) for x, y in pairs)


def logged_iterations(folder: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def stop_after(digits, out: Path, iterations: int) -> None:
    """Run until ``iterations`` are done, then die like a killed process (the checkpoints at 2 and 4 exist)."""
    distiller = make(digits)
    real_step = distiller.step

    def step(iteration):
        if iteration == iterations:
            raise KeyboardInterrupt
        return real_step(iteration)

    distiller.step = step
    with pytest.raises(KeyboardInterrupt):
        run_distillation(distiller, out, checkpoint_every=EVERY, progress=False)


def resume(digits, out: Path) -> SyntheticSet:
    return run_distillation(make(digits), out, checkpoint_every=EVERY, resume=True, progress=False)


# -- the checkpoint files ------------------------------------------------------------------------------------------


def test_checkpoint_carries_format_checksum_and_a_previous_one(digits, full, tmp_path):
    stop_after(digits, tmp_path, 5)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    data = (tmp_path / "checkpoint.pt").read_bytes()
    assert record["format"] == "fastdd-checkpoint/1" and record["iteration"] == 4
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["format"] == "fastdd-checkpoint/1"
    previous = json.loads((tmp_path / "checkpoint.prev.json").read_text())
    assert previous["iteration"] == 2 and previous["file"] == "checkpoint.prev.pt"
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["iteration"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid latest checkpoint is used without a word
        assert load_checkpoint(tmp_path)["iteration"] == 4


def _truncate(folder):
    path = folder / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(folder):
    path = folder / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _drop_sidecar(folder):
    (folder / "checkpoint.json").unlink()


def _other_checksum(folder):
    record = json.loads((folder / "checkpoint.json").read_text())
    record["sha256"] = hashlib.sha256(b"something else").hexdigest()
    (folder / "checkpoint.json").write_text(json.dumps(record))


def _drop_latest(folder):
    (folder / "checkpoint.pt").unlink()


DAMAGE = {"truncated": _truncate, "flipped_byte": _flip_byte, "missing_sidecar": _drop_sidecar,
          "checksum_mismatch": _other_checksum, "missing_latest": _drop_latest}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(digits, full, tmp_path, damage):
    stop_after(digits, tmp_path, 5)
    DAMAGE[damage](tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # and a metrics line cut short by the kill
    with pytest.warns(FastddWarning, match=r"continues from the previous one, checkpoint\.prev\.pt \(iteration 2\)"):
        resumed = resume(digits, tmp_path)
    assert same_synset(resumed, full)
    assert logged_iterations(tmp_path) == [1, 2, 3, 4, 5, 6]  # cut back to iteration 2, then 3..6 again


def test_tesla_falls_back_too_and_keeps_its_learned_lr(digits, tmp_path):
    """Trajectory matching carries more state (the learned step size and its optimiser): same guarantee."""
    from fastdd.distill.experts import ExpertConfig, train_experts

    experts = tmp_path / "experts"
    train_experts(ExpertConfig(width=8, num_experts=1, epochs=2), digits, experts, progress=False)
    cls = get_distiller("tesla")
    options = dict(ipc=1, iterations=4, width=8, syn_steps=2, expert_epochs=1, max_start_epoch=1, lr_img=10.0,
                   lr_lr=1e-5, experts=str(experts), seed=5)

    def tesla():
        return cls(cls.config_class.from_options(options, method="tesla"), digits)

    uninterrupted = run_distillation(tesla(), tmp_path / "full", progress=False)
    stopped = tesla()
    real_step = stopped.step

    def step(iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return real_step(iteration)

    stopped.step = step
    with pytest.raises(KeyboardInterrupt):
        run_distillation(stopped, tmp_path / "run", checkpoint_every=1, progress=False)
    _truncate(tmp_path / "run")
    with pytest.warns(FastddWarning, match=r"\(iteration 2\)"):
        resumed = run_distillation(tesla(), tmp_path / "run", checkpoint_every=1, resume=True, progress=False)
    assert resumed.syn_lr is not None and same_synset(resumed, uninterrupted)


def test_fallback_warning_is_one_line_on_the_command_line(tmp_path):
    args = ["--threads", "1", "distill", "--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16",
            "--iterations", "4", "--checkpoint-every", "1", "--quiet", "--out", str(tmp_path)]
    assert cli.invoke(app, args).exit_code == 0
    _flip_byte(tmp_path)
    result = cli.invoke(app, [*args, "--resume", "--iterations", "5"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the latest checkpoint"), result.stderr
    assert "SHA-256" in lines[0] and "(iteration 3)" in lines[0]


def test_resume_removes_half_written_files_of_a_killed_process(digits, full, tmp_path):
    stop_after(digits, tmp_path, 5)
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".synset.safetensors.xyz.tmp").write_bytes(b"half a set")
    (tmp_path / ".notes.txt.tmp").write_text("not ours")
    assert same_synset(resume(digits, tmp_path), full)
    assert [p.name for p in tmp_path.glob(".*.tmp")] == [".notes.txt.tmp"]


def test_checkpoint_from_before_checksums_still_resumes(digits, full, tmp_path):
    stop_after(digits, tmp_path, 5)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["format"]
    torch.save(state, tmp_path / "checkpoint.pt")
    for name in ("checkpoint.json", "checkpoint.prev.pt", "checkpoint.prev.json"):
        (tmp_path / name).unlink()
    with pytest.warns(FastddWarning, match="before checkpoints carried checksums"):
        assert same_synset(resume(digits, tmp_path), full)


def test_no_valid_checkpoint_is_one_clear_error(digits, tmp_path):
    stop_after(digits, tmp_path, 5)
    _truncate(tmp_path)
    (tmp_path / "checkpoint.prev.json").unlink()
    with pytest.raises(FastddError, match=r"no usable checkpoint .*truncated.*checkpoint\.prev\.json is missing"):
        resume(digits, tmp_path)


class _Killed(BaseException):
    """The process dies here: nothing after this point runs (and nothing catches it)."""


@pytest.mark.parametrize("renames_done", range(6))
def test_death_at_any_step_of_a_checkpoint_write_resumes_exactly(digits, full, tmp_path, monkeypatch, renames_done):
    """Die right before the n-th rename of the checkpoint written at iteration 4 (rotate checkpoint.pt and .json to
    .prev, replace checkpoint.pt, then checkpoint.json, then the synthetic set): a resume always finds a valid
    checkpoint (iteration 2 or 4) and ends bit-identical to the uninterrupted run."""
    calls = {"checkpoints": 0, "renames": 0}
    real_save, real_replace = runner_module.save_checkpoint, os.replace

    def save_checkpoint(folder, state):
        calls["checkpoints"] += 1
        return real_save(folder, state)

    def replace(src, dst, *args, **kwargs):
        if calls["checkpoints"] == 2:
            if calls["renames"] == renames_done:
                raise _Killed
            calls["renames"] += 1
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(runner_module, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(_Killed):
        run_distillation(make(digits), tmp_path, checkpoint_every=EVERY, progress=False)
    monkeypatch.undo()
    expected_start = 4 if renames_done >= 4 else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_checkpoint(tmp_path)["iteration"] == expected_start
        resumed = resume(digits, tmp_path)
    # Only a death between replacing checkpoint.pt and its checksum file leaves the latest unusable.
    assert [w.category for w in caught] == ([FastddWarning] * 2 if renames_done == 3 else [])
    assert same_synset(resumed, full)
    assert logged_iterations(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    """A real `python -m fastdd distill` process, killed with SIGKILL while it checkpoints every iteration, then
    continued with --resume: the final set equals an uninterrupted run with the same seed."""
    iterations, kill_after = 25, 4
    args = ["distill", "--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16", "--seed", "7",
            "--iterations", str(iterations), "--quiet"]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(  # a checkpoint every iteration: the kill most likely lands in the middle of one
        [sys.executable, "-m", "fastdd", "--threads", "1", *args, "--checkpoint-every", "1", "--out", str(killed)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= kill_after):
            assert process.poll() is None, f"the run ended before it was killed: {process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the run did not reach the kill point in time"
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    done = metrics.read_text().count("\n")
    assert done < iterations, "the kill came after the run had finished"

    # Where checkpoints are written does not change the result: the two runs below only write the final one.
    resumed = cli.invoke(app, ["--threads", "1", *args, "--checkpoint-every", "1000", "--out", str(killed), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    uninterrupted = cli.invoke(app, ["--threads", "1", *args, "--checkpoint-every", "1000", "--out",
                                     str(tmp_path / "full")])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert same_synset(SyntheticSet.load(killed), SyntheticSet.load(tmp_path / "full"))
    assert logged_iterations(killed) == list(range(1, iterations + 1))
    assert not list(killed.glob(".*.tmp")), "half-written files of the killed process were left behind"


# -- unwritable folders and full disks -------------------------------------------------------------------------------

DM = ["--threads", "1", "distill", "--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16",
      "--iterations", "2", "--quiet"]
EXPERTS = ["--threads", "1", "experts", "--num-experts", "1", "--epochs", "1", "--width", "8", "--quiet"]



@pytest.mark.parametrize("command", [DM, EXPERTS], ids=["distill", "experts"])
def test_output_folder_that_cannot_be_created(tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = cli.invoke(app, [*command, "--out", str(blocker / "run")])
    assert_one_sentence_error(result, "cannot create the output folder", "Not a directory")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; covered by the not-a-folder test")
def test_read_only_output_folder_keeps_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert cli.invoke(app, [*DM, "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    out.chmod(0o500)
    try:
        result = cli.invoke(app, [*DM, "--seed", "9", "--overwrite", "--out", str(out)])
    finally:
        out.chmod(0o700)
    assert_one_sentence_error(result, "cannot write into the output folder")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_folder_refusing_writes_keeps_the_earlier_run(tmp_path, monkeypatch):
    """What a read-only folder does for a normal user (simulated, as root writes anyway): --overwrite deletes
    nothing, one sentence, exit 2."""
    out = tmp_path / "run"
    assert cli.invoke(app, [*DM, "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_mkstemp = io_module.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(io_module.tempfile, "mkstemp", mkstemp)
    result = cli.invoke(app, [*DM, "--seed", "9", "--overwrite", "--out", str(out)])
    assert_one_sentence_error(result, "cannot write into the output folder", "Permission denied")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_complete_experts_folder_is_only_read(tmp_path, monkeypatch):
    """A folder holding every expert asked for may be a read-only cache: no pre-flight write, no space needed."""
    out = tmp_path / "experts"
    assert cli.invoke(app, [*EXPERTS, "--out", str(out)]).exit_code == 0
    monkeypatch.setattr(io_module, "MIN_FREE_BYTES", 2**62)
    result = cli.invoke(app, [*EXPERTS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_one_sentence_error(cli.invoke(app, [*EXPERTS, "--num-experts", "2", "--out", str(out)]), "are free")


@pytest.mark.parametrize("command", [DM, EXPERTS], ids=["distill", "experts"])
def test_full_disk_is_refused_before_work_starts(tmp_path, monkeypatch, command):
    out = tmp_path / "run"
    if command is DM:
        assert cli.invoke(app, [*DM, "--out", str(out)]).exit_code == 0
        command = [*DM, "--seed", "9", "--overwrite"]  # --overwrite must not delete anything before the check
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    monkeypatch.setattr(io_module, "MIN_FREE_BYTES", 2**62)
    result = cli.invoke(app, [*command, "--out", str(out)])
    assert_one_sentence_error(result, "are free on the disk holding", "free some space")
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == before


def _disk_fills_at_checkpoint(monkeypatch, which: int):
    """The ``which``-th write of checkpoint.pt runs out of space half-way through."""
    real = io_module.atomic_write
    seen = {"n": 0}

    def atomic_write(path, write, **kwargs):
        if Path(path).name == "checkpoint.pt":
            seen["n"] += 1
            if seen["n"] == which:
                def partial(tmp):
                    Path(tmp).write_bytes(b"\0" * 100)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

                return real(path, partial, **kwargs)
        return real(path, write, **kwargs)

    monkeypatch.setattr(io_module, "atomic_write", atomic_write)


def test_full_disk_mid_run_keeps_the_last_checkpoint_and_synset(digits, full, tmp_path, monkeypatch):
    _disk_fills_at_checkpoint(monkeypatch, 2)
    with pytest.raises(FastddError, match=r"No space left on device.*iteration 2 .* intact.*--resume") as info:
        run_distillation(make(digits), tmp_path, checkpoint_every=EVERY, progress=False)
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*.tmp")), "a partial temporary file was left behind"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_checkpoint(tmp_path)
    assert state["iteration"] == 2
    assert torch.equal(SyntheticSet.load(tmp_path).images, state["distiller"]["images"])
    assert same_synset(resume(digits, tmp_path), full)  # space freed: the run continues exactly


def test_full_disk_mid_run_on_the_command_line(tmp_path, monkeypatch):
    _disk_fills_at_checkpoint(monkeypatch, 2)
    result = cli.invoke(app, [*DM, "--iterations", "3", "--checkpoint-every", "1", "--out", str(tmp_path)])
    assert_one_sentence_error(result, "No space left on device", "iteration 1", "--resume")
