"""The command line: the main job on digits, and one clear sentence with a non-zero exit for bad input."""

import json

import torch
from typer.testing import CliRunner

from fastdd.cli import app

from cli_errors import assert_one_sentence_error

runner = CliRunner()
TINY = ["--width", "8", "--batch-real", "16", "--iterations", "2", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])



def test_distill_evaluate_show_export(tmp_path):
    out = tmp_path / "run"
    result = invoke("distill", "--method", "dm", "--ipc", "2", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    report = tmp_path / "eval.json"
    result = invoke("evaluate", out, "--runs", "1", "--epochs", "3", "--json", report, "--quiet")
    assert result.exit_code == 0, result.output
    assert "convnet: acc" in result.output
    data = json.loads(report.read_text())
    assert data["dataset"] == "digits" and 0 <= data["models"]["convnet"]["acc"]["mean"] <= 100
    grid = tmp_path / "grid.png"
    assert invoke("show", out, "--out", grid).exit_code == 0 and grid.stat().st_size > 0
    assert invoke("export", out).exit_code == 0
    assert torch.load(out / "images_best.pt", weights_only=True).shape == (20, 1, 8, 8)


def test_config_preset_and_command_line_precedence(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("method: dm\nipc: 3\nlr-img: 0.5\n")
    out = tmp_path / "run"
    result = invoke("distill", "--config", preset, "--ipc", "2", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "synset.json").read_text())
    assert meta["method"] == "dm" and meta["ipc"] == 2 and meta["hyperparameters"]["lr_img"] == 0.5


def test_info_reports_backends():
    result = invoke("info")
    assert result.exit_code == 0
    assert "C++ extension fastdd._C" in result.output and "torch" in result.output


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    result = invoke("distill", "--dataset", "cifar10", "--data-root", missing, "--out", tmp_path / "o", *TINY)
    assert_one_sentence_error(result, str(missing))
    assert not (tmp_path / "o").exists()


def test_ipc_above_smallest_class(tmp_path):
    result = invoke("distill", "--method", "dm", "--ipc", "1000", "--out", tmp_path / "o", *TINY)
    assert_one_sentence_error(result, "smallest class")


def test_unknown_method_and_dataset(tmp_path):
    assert_one_sentence_error(invoke("distill", "--method", "magic", "--out", tmp_path / "o"), "magic", "dsa")
    assert_one_sentence_error(invoke("distill", "--dataset", "imagenet-21k", "--out", tmp_path / "o"), "imagenet-21k")


def test_option_of_another_method(tmp_path):
    result = invoke("distill", "--method", "dm", "--outer-loop", "3", "--out", tmp_path / "o", *TINY)
    assert_one_sentence_error(result, "outer_loop")


def test_existing_output_is_kept(tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    before = (out / "synset.safetensors").read_bytes()
    assert_one_sentence_error(invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY), "--resume")
    assert (out / "synset.safetensors").read_bytes() == before


def test_evaluate_not_a_synset(tmp_path):
    assert_one_sentence_error(invoke("evaluate", tmp_path), "not a synthetic set")


def test_bad_preset(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("ipc: [1, 2\n")
    assert_one_sentence_error(invoke("distill", "--config", preset, "--out", tmp_path / "o"), "YAML")


def test_overwrite_replaces_an_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    before = (out / "synset.safetensors").read_bytes()
    result = invoke("distill", "--method", "dm", "--ipc", "1", "--seed", "5", "--overwrite", "--out", out, *TINY)
    assert result.exit_code == 0, result.output
    assert (out / "synset.safetensors").read_bytes() != before
    assert_one_sentence_error(
        invoke("distill", "--method", "dm", "--resume", "--overwrite", "--out", out, *TINY), "contradict"
    )


def test_threads_option_sets_torch_threads():
    import torch

    before = torch.get_num_threads()
    try:
        result = invoke("--threads", 2, "info")
        assert result.exit_code == 0, result.output
        assert any(line.split()[-1] == "2" for line in result.output.splitlines() if line.startswith("torch threads"))
    finally:
        torch.set_num_threads(before)
    assert_one_sentence_error(invoke("--threads", 0, "info"), "--threads")
