"""Safe files: no load path unpickles arbitrary objects, and every file's format version is checked.

A crafted pickle whose unpickling would create a marker file (``os.system("touch ...")``) is planted as a checkpoint,
an expert file, a teacher checkpoint and a synthetic set; each load refuses it with one clear FastddError and the
marker is never created."""

import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.expert_files import EXPERTS_META, FORMAT as EXPERTS_FORMAT, load_experts, write_snapshots
from fastdd.errors import FastddError, UnsafeFileError
from fastdd.io import SyntheticSet, load_checkpoint
from fastdd.trust.teacher import load_teacher

cli = CliRunner()


class Exploit:
    """Unpickling this runs a shell command (what a hostile file would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path, marker):
    """Write a file that runs code when unpickled, the way `torch.save` would save a hostile state."""
    torch.save({"iteration": 1, "distiller": {"images": torch.zeros(1)}, "payload": Exploit(marker)}, path)


def test_the_crafted_pickle_really_runs_code_when_unpickled_unsafely(tmp_path):
    plant(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe call fastdd never makes
    assert (tmp_path / "marker").exists()


def _checksum_file(path, *, fmt="fastdd-checkpoint/1"):
    data = path.read_bytes()
    record = {"format": fmt, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "iteration": 1}
    (path.parent / "checkpoint.json").write_text(json.dumps(record))


@pytest.mark.parametrize("with_checksum", [False, True], ids=["bare", "valid_checksum"])
def test_hostile_checkpoint_is_refused_not_run(tmp_path, with_checksum):
    marker = tmp_path / "marker"
    plant(tmp_path / "checkpoint.pt", marker)
    if with_checksum:  # the attacker also wrote a matching checksum file: the checksum passes, the unpickler refuses
        _checksum_file(tmp_path / "checkpoint.pt")
    with pytest.raises(UnsafeFileError, match=r"\((posix|nt)\.system\), and fastdd refuses to unpickle"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_hostile_checkpoint_on_the_command_line(tmp_path):
    marker = tmp_path / "marker"
    out = tmp_path / "run"
    out.mkdir()
    plant(out / "checkpoint.pt", marker)
    _checksum_file(out / "checkpoint.pt")
    result = cli.invoke(app, ["distill", "--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16",
                              "--iterations", "2", "--quiet", "--resume", "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refuses to unpickle" in lines[0], result.stderr
    assert not marker.exists()


def _experts_folder(folder, *, fmt=EXPERTS_FORMAT):
    folder.mkdir(exist_ok=True)
    (folder / EXPERTS_META).write_text(json.dumps({"format": fmt, "settings_digest": "d", "num_params": 3}))
    return folder


def test_hostile_expert_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker"
    folder = _experts_folder(tmp_path / "experts")
    plant(folder / "expert_0000.safetensors", marker)
    with pytest.raises(FastddError, match="expert_0000.safetensors could not be read"):
        load_experts(folder)
    meta = {"model": "convnet", "num_classes": 10, "hyperparameters": {"width": 8}}
    shape = SimpleNamespace(channels=1, num_classes=10, image_size=(8, 8))
    with pytest.raises(FastddError):  # as a teacher (one expert file) too
        load_teacher(str(folder / "expert_0000.safetensors"), synset_meta=meta, shape=shape)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["teacher.pt", "teacher.pth"])
def test_hostile_teacher_checkpoint_is_refused_not_run(tmp_path, name):
    marker = tmp_path / "marker"
    plant(tmp_path / name, marker)
    meta = {"model": "convnet", "num_classes": 10, "hyperparameters": {"width": 8}}
    shape = SimpleNamespace(channels=1, num_classes=10, image_size=(8, 8))
    with pytest.raises(UnsafeFileError, match="refuses to unpickle"):
        load_teacher(str(tmp_path / name), synset_meta=meta, shape=shape)
    assert not marker.exists()


def test_hostile_synthetic_set_is_refused_not_run(tmp_path):
    marker = tmp_path / "marker"
    plant(tmp_path / "synset.safetensors", marker)
    (tmp_path / "synset.json").write_text(json.dumps({"format": "fastdd-synset/1", "dataset": "digits"}))
    with pytest.raises(FastddError, match="could not read the synthetic set"):
        SyntheticSet.load(tmp_path)
    result = cli.invoke(app, ["evaluate", str(tmp_path), "--runs", "1", "--epochs", "1", "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not marker.exists()


# -- format versions ------------------------------------------------------------------------------------------------


def _synset(folder):
    SyntheticSet(images=torch.zeros(2, 1, 8, 8), labels=torch.arange(2), meta={"dataset": "digits"}).save(folder)


def test_synset_records_its_format_and_a_newer_one_is_refused(tmp_path):
    _synset(tmp_path)
    meta = json.loads((tmp_path / "synset.json").read_text())
    assert meta["format"] == "fastdd-synset/1"
    meta["format"] = "fastdd-synset/2"
    (tmp_path / "synset.json").write_text(json.dumps(meta))
    with pytest.raises(FastddError, match=r"written by a newer fastdd \(format 'fastdd-synset/2'.*upgrade fastdd"):
        SyntheticSet.load(tmp_path)
    result = cli.invoke(app, ["show", str(tmp_path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "newer fastdd" in lines[0], result.stderr
    meta["format"] = "someone-else/1"
    (tmp_path / "synset.json").write_text(json.dumps(meta))
    with pytest.raises(FastddError, match="is not a synthetic set this fastdd can read"):
        SyntheticSet.load(tmp_path)


def test_newer_experts_formats_are_refused(tmp_path):
    folder = _experts_folder(tmp_path / "newer-folder", fmt="fastdd-experts/2")
    with pytest.raises(FastddError, match="newer fastdd"):
        load_experts(folder)
    folder = _experts_folder(tmp_path / "newer-file")
    write_snapshots(folder / "expert_0000.safetensors", torch.zeros(2, 3),
                    {"format": "fastdd-experts/2", "settings_digest": "d"})
    with pytest.raises(FastddError, match=r"expert_0000\.safetensors was written by a newer fastdd"):
        load_experts(folder)


@pytest.mark.parametrize("where", ["checksum_file", "state"])
def test_newer_checkpoint_format_is_refused(tmp_path, where):
    fmt = "fastdd-checkpoint/2"
    state = {"iteration": 1, "format": fmt if where == "state" else "fastdd-checkpoint/1"}
    torch.save(state, tmp_path / "checkpoint.pt")
    _checksum_file(tmp_path / "checkpoint.pt", fmt=fmt if where == "checksum_file" else "fastdd-checkpoint/1")
    with pytest.raises(FastddError, match="newer fastdd"):
        load_checkpoint(tmp_path)
