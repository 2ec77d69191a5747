"""Expert trajectories: what is recorded, reproducibility, extending and resuming a folder, checked lazy loading."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import fastdd.distill.experts as experts_module
from fastdd.data import load_dataset
from fastdd.distill.experts import (
    ExpertConfig,
    default_expert_folder,
    ensure_experts,
    expected_metadata,
    expert_seed,
    train_experts,
)
from fastdd.errors import FastddError
from fastdd.expert_files import FORMAT, expert_file_name, load_experts, write_snapshots
from fastdd.models import build_model, flat_parameters
from fastdd.training import train_epoch

EPOCHS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions are fastest on one thread, and far slower on two when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make_config(**overrides):
    settings = dict(dataset="digits", width=8, num_experts=2, epochs=EPOCHS, batch_size=256, seed=3)
    settings.update(overrides)
    return ExpertConfig(**settings)


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """A fresh 2-expert folder: (folder, {file name: bytes})."""
    folder = tmp_path_factory.mktemp("reference")
    train_experts(make_config(), digits, folder, progress=False)
    return folder, file_bytes(folder)


def file_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("expert_*.safetensors"))}


def snapshots_of(folder, k):
    return load_file(str(Path(folder) / expert_file_name(k)))["snapshots"]


def test_trajectory_is_init_then_every_epoch(digits, reference):
    folder, _ = reference
    config = make_config()
    for k in range(2):
        recorded = snapshots_of(folder, k)
        # Oracle: the same training written out by hand from expert k's generator.
        g = torch.Generator().manual_seed(expert_seed(config.seed, k))
        net = build_model("convnet", channels=1, num_classes=10, image_size=8, width=8, generator=g)
        expected = [flat_parameters(net).detach().clone()]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0, weight_decay=0)
        for _ in range(EPOCHS):
            train_epoch(net, optimizer, digits.train_images, digits.train_labels, batch_size=256, generator=g,
                        dsa_strategy=digits.dsa_strategy)
            expected.append(flat_parameters(net).detach().clone())
        assert recorded.shape == (EPOCHS + 1, expected[0].numel())
        assert recorded.dtype == torch.float32
        torch.testing.assert_close(recorded, torch.stack(expected), rtol=0, atol=0)
        for s in range(EPOCHS):
            assert (recorded[s + 1] - recorded[s]).abs().max() > 1e-4
    assert not torch.equal(snapshots_of(folder, 0)[0], snapshots_of(folder, 1)[0])


def test_folder_metadata(digits, reference):
    folder, _ = reference
    meta = json.loads((folder / "experts.json").read_text())
    assert meta["dataset"] == "digits" and meta["model"] == "convnet" and meta["depth"] == 2
    assert meta["image_shape"] == [1, 8, 8] and meta["num_classes"] == 10
    assert meta["mean"] == list(digits.mean) and meta["zca"] is False
    assert meta["dsa_strategy"] == digits.dsa_strategy and meta["epochs"] == EPOCHS
    assert meta["num_params"] == snapshots_of(folder, 0).shape[1]
    assert sum(torch.Size(p["shape"]).numel() for p in meta["parameter_layout"]) == meta["num_params"]
    assert [e["file"] for e in meta["experts"]] == ["expert_0000.safetensors", "expert_0001.safetensors"]
    for e in meta["experts"]:
        assert 0.0 <= e["test_accuracy"] <= 1.0
    with safe_open(str(folder / "expert_0001.safetensors"), framework="pt") as f:
        header = f.metadata()
    assert header["expert"] == "1" and header["settings_digest"] == meta["settings_digest"]
    assert float(header["test_accuracy"]) == meta["experts"][1]["test_accuracy"]
    epochs_logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert sum("epoch" in r for r in epochs_logged) == 2 * EPOCHS


def test_same_config_gives_identical_files(digits, reference, tmp_path):
    _, expected = reference
    train_experts(make_config(), digits, tmp_path, progress=False)
    assert file_bytes(tmp_path) == expected


def test_extending_a_folder_keeps_old_experts_and_matches_a_fresh_run(digits, reference, tmp_path):
    _, expected = reference
    train_experts(make_config(num_experts=1), digits, tmp_path, progress=False)
    first = (tmp_path / "expert_0000.safetensors").stat().st_mtime_ns
    trained = []
    result = train_experts(make_config(num_experts=2), digits, tmp_path, progress=False,
                           on_expert=lambda k, acc: trained.append(k))
    assert trained == [1]
    assert (tmp_path / "expert_0000.safetensors").stat().st_mtime_ns == first
    assert file_bytes(tmp_path) == expected
    assert result.num_experts == 2
    assert len(json.loads((tmp_path / "experts.json").read_text())["experts"]) == 2


def test_other_settings_in_the_folder_are_refused(digits, reference):
    folder, expected = reference
    with pytest.raises(FastddError, match="lr_teacher"):
        train_experts(make_config(lr_teacher=0.02), digits, folder, progress=False)
    assert file_bytes(folder) == expected


def test_keep_snapshots_truncates_and_stops_training_early(digits, reference, tmp_path):
    folder, _ = reference
    config = make_config(epochs=50, keep_snapshots=2, num_experts=1)
    assert config.epochs_trained == 1
    result = train_experts(config, digits, tmp_path, progress=False)
    assert result.num_snapshots == 2
    stored = snapshots_of(tmp_path, 0)
    assert torch.equal(stored, snapshots_of(folder, 0)[:2])
    with pytest.raises(FastddError, match="at least 2"):
        make_config(keep_snapshots=1)


def test_lazy_rows_equal_the_stored_tensor(reference):
    folder, _ = reference
    experts = load_experts(folder)
    assert (experts.num_experts, experts.num_snapshots) == (2, EPOCHS + 1)
    for k in range(2):
        full = snapshots_of(folder, k)
        assert experts.num_params == full.shape[1]
        for s in range(EPOCHS + 1):
            assert torch.equal(experts.snapshot(k, s), full[s])
        start, target = experts.pair(k, 0, 2)
        assert torch.equal(start, full[0]) and torch.equal(target, full[2])
        start.zero_()
        assert torch.equal(experts.pair(k, 0, 1)[0], full[0])
        assert torch.equal(experts.trajectory(k), full)
    row = experts.snapshot(1, 1)
    row += 1.0  # the rows handed out are copies: later reads are unchanged
    assert torch.equal(experts.snapshot(1, 1), snapshots_of(folder, 1)[1])
    with pytest.raises(IndexError):
        experts.pair(0, 1, 2)
    with pytest.raises(IndexError):
        experts.snapshot(2, 0)
    limited = load_experts(folder, max_snapshots=2, max_experts=1)
    assert (limited.num_experts, limited.num_snapshots) == (1, 2)
    with pytest.raises(IndexError):
        limited.snapshot(0, 2)


def _rss_file_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    return None


def test_a_pair_reads_only_its_rows(tmp_path):
    if _rss_file_kb() is None:
        pytest.skip("needs Linux /proc/self/status")
    rows, params = 32, 500_000  # a 64 MB trajectory, 2 MB per snapshot
    data = torch.arange(rows, dtype=torch.float32).repeat_interleave(params).view(rows, params)
    write_snapshots(tmp_path / expert_file_name(0), data, {"settings_digest": "d"})
    del data
    meta = {"format": FORMAT, "settings_digest": "d", "num_params": params}
    (tmp_path / "experts.json").write_text(json.dumps(meta))
    experts = load_experts(tmp_path)
    before = _rss_file_kb()
    start, target = experts.pair(0, 5, 4)
    grown_mb = (_rss_file_kb() - before) / 1024
    assert torch.equal(start, torch.full((params,), 5.0)) and torch.equal(target, torch.full((params,), 9.0))
    assert grown_mb < 32, f"reading two 2 MB snapshots mapped {grown_mb:.1f} MB of a 64 MB file"


def test_write_snapshots_is_a_safetensors_file(tmp_path):
    data = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    write_snapshots(tmp_path / "a.safetensors", data, {"b": "2", "a": "1"})
    write_snapshots(tmp_path / "b.safetensors", data, {"a": "1", "b": "2"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["snapshots"], data)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata() == {"a": "1", "b": "2"}
    with pytest.raises(ValueError, match="float32"):
        write_snapshots(tmp_path / "c.safetensors", data.double(), {})


def test_expect_accepts_matching_metadata(digits, reference):
    folder, _ = reference
    expect = expected_metadata(make_config(), digits)
    assert expect["depth"] == 2 and expect["num_params"] == snapshots_of(folder, 0).shape[1]
    assert load_experts(folder, expect=expect).num_experts == 2
    # an explicit depth equal to the default, and tuples instead of lists, also match
    assert load_experts(folder, expect={**expect, "mean": tuple(digits.mean), "image_shape": (1, 8, 8)})


@pytest.mark.parametrize(
    "field,value",
    [("dataset", "mnist"), ("model", "alexnet"), ("mean", [0.1307]), ("num_params", 12345), ("zca", True)],
)
def test_expect_mismatch_names_the_field(digits, reference, field, value):
    folder, _ = reference
    expect = {**expected_metadata(make_config(), digits), field: value}
    with pytest.raises(FastddError) as info:
        load_experts(folder, expect=expect)
    message = str(info.value)
    assert field in message and "--experts" in message and "fastdd experts" in message
    assert "\n" not in message


def test_missing_empty_and_short_folders(reference, tmp_path):
    folder, _ = reference
    with pytest.raises(FastddError, match="no expert trajectories"):
        load_experts(tmp_path / "nowhere")
    with pytest.raises(FastddError, match="no expert trajectories"):
        load_experts(tmp_path)
    (tmp_path / "experts.json").write_text((folder / "experts.json").read_text())
    with pytest.raises(FastddError, match="no expert files"):
        load_experts(tmp_path)
    with pytest.raises(FastddError, match="3 snapshots .* 5 are needed"):
        load_experts(folder, max_snapshots=5)
    with pytest.raises(FastddError, match="missing: 2"):
        load_experts(folder, max_experts=3)


def test_an_interrupted_run_keeps_finished_experts_and_continues(digits, reference, tmp_path, monkeypatch):
    _, expected = reference
    calls = []

    def interrupted_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) > EPOCHS:  # the first epoch of expert 1
            raise KeyboardInterrupt
        return train_epoch(*args, **kwargs)

    monkeypatch.setattr(experts_module, "train_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_experts(make_config(), digits, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_0000.safetensors", "experts.json", "metrics.jsonl"]
    assert file_bytes(tmp_path) == {"expert_0000.safetensors": expected["expert_0000.safetensors"]}
    assert load_experts(tmp_path).num_experts == 1

    monkeypatch.setattr(experts_module, "train_epoch", train_epoch)
    trained = []
    train_experts(make_config(), digits, tmp_path, progress=False, on_expert=lambda k, acc: trained.append(k))
    assert trained == [1]
    assert file_bytes(tmp_path) == expected


def test_ensure_experts_reuses_a_complete_folder(digits, reference, monkeypatch):
    folder, expected = reference

    def no_training(*args, **kwargs):
        raise AssertionError("a complete folder must not be trained again")

    monkeypatch.setattr(experts_module, "train_epoch", no_training)
    experts = ensure_experts(make_config(num_experts=1), digits, folder, progress=False)
    assert (experts.num_experts, experts.num_snapshots) == (1, EPOCHS + 1)
    assert file_bytes(folder) == expected


def test_default_folder_depends_on_what_changes_the_trajectory(tmp_path):
    base = default_expert_folder(make_config(), tmp_path)
    assert base.parent == tmp_path and base.name.startswith("experts-digits-convnet-")
    assert default_expert_folder(make_config(), tmp_path) == base
    assert default_expert_folder(make_config(num_experts=7, device="meta", data_root=str(tmp_path)), tmp_path) == base
    for change in ({"seed": 4}, {"width": 16}, {"lr_teacher": 0.02}, {"dsa": False}, {"epochs": 3}, {"zca": True}):
        assert default_expert_folder(make_config(**change), tmp_path) != base, change
    # keeping 3 of 50 snapshots trains (and stores) exactly what a 2-epoch run does
    assert default_expert_folder(make_config(epochs=50, keep_snapshots=3), tmp_path) == base


def test_a_damaged_expert_file_is_a_user_error(digits, reference, tmp_path):
    folder, expected = reference
    for name, data in expected.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "experts.json").write_text((folder / "experts.json").read_text())
    (tmp_path / "expert_0001.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FastddError, match="expert_0001.safetensors could not be read"):
        load_experts(tmp_path)
    with pytest.raises(FastddError, match="delete it to retrain"):
        train_experts(make_config(), digits, tmp_path, progress=False)
