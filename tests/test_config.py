"""The config layer: fields checked from their declarations, the command line derived from them, bad input refused
with one sentence that names the option, and nothing written or overwritten by a refused run."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.config import METHOD_CONFIGS, ConfigError, DMConfig, DSAConfig, TrajectoryConfig, method_config
from fastdd.config.experts import ExpertConfig
from fastdd.config.options import info_of, option_fields
from fastdd.data import load_dataset
from fastdd.distill import get_distiller, run_distillation
from fastdd.distill.runner import settings_differences
from fastdd.errors import FastddError, Interrupted
from fastdd.io import SYNSET_META, SYNSET_TENSORS

from cli_errors import assert_one_sentence_error as one_sentence

runner = CliRunner()
TINY = ["--width", "8", "--batch-real", "16", "--iterations", "2", "--quiet"]


def invoke(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)



@pytest.mark.parametrize("options,fragments", [
    (dict(lr_img=math.nan), ("--lr-img", "finite", "lr_img")),
    (dict(lr_img=math.inf), ("--lr-img", "finite")),
    (dict(ipc=0), ("--ipc must be at least 1", "ipc")),
    (dict(ipc=2.5), ("--ipc must be a whole number",)),
    (dict(momentum_img=1.0), ("--momentum-img must be less than 1",)),
    (dict(dis_metric="l1"), ("--dis-metric must be one of ours, mse, cos",)),
    (dict(cvar_alpha=0.0), ("--cvar-alpha must be greater than 0",)),
    (dict(mask_ratio=1.0, mdt=True), ("--mask-ratio must be less than 1",)),
    (dict(zca="yes"), ("--zca must be true or false",)),
    (dict(device="cuda:x"), ("--device",)),
])
def test_a_bad_value_is_a_value_error_naming_the_field(options, fragments):
    with pytest.raises(ValueError) as info:
        DSAConfig.from_options(options, method="dsa")
    assert isinstance(info.value, ConfigError)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_every_config_checks_itself_when_made():
    with pytest.raises(ConfigError, match="--width must be at least 1"):
        DMConfig(width=0)
    with pytest.raises(ConfigError, match="--keep-snapshots must be at least 2"):
        ExpertConfig(keep_snapshots=1)


def test_choices_accept_any_case_and_underscores():
    assert DSAConfig(dataset="Fashion_MNIST", norm="BatchNorm").dataset == "fashion-mnist"
    assert method_config("DSA") is DSAConfig and method_config("tesla_compat").method == "tesla-compat"
    assert get_distiller("TESLA").name == "tesla"
    with pytest.raises(ConfigError, match="--method must be one of dc, dsa, dm, mtt, tesla, tesla-compat"):
        method_config("idc")


def test_cuda_without_a_gpu_is_refused_when_the_config_is_made():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        DSAConfig(device="cuda")


def test_every_method_option_is_a_flag_of_distill_with_its_panel_and_default():
    result = invoke("distill", "--help", env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for config in METHOD_CONFIGS.values():
        for f in option_fields(config):
            flag = (info_of(f).flag or "--" + f.name.replace("_", "-")).split("/")[0]
            assert flag in text, flag
            assert info_of(f).help and info_of(f).panel in text
    assert "(default: dc, dsa 0.1; dm 1.0; mtt, tesla, tesla-compat the preset)" in text
    assert "[dc|dsa|dm|mtt|tesla|tesla-compat]" in text and "[none|oe|poe]" in text


def test_distill_defaults_are_the_config_defaults():
    """A run given no options records exactly the fields' defaults (the help has no copies to drift)."""
    recorded = {f.name: f.default for f in option_fields(DSAConfig) if info_of(f).recorded_at_default}
    assert DSAConfig.from_options({}, method="dsa").to_dict() == {
        k: v for k, v in recorded.items() if k not in ("mdt", "mask_ratio")
    }
    assert TrajectoryConfig.from_options({}, method="mtt").resolved().iterations == 200  # digits preset


def test_nan_learning_rate_on_the_command_line_writes_nothing(tmp_path):
    out = tmp_path / "run"
    line = one_sentence(invoke("distill", "--method", "dm", "--ipc", "1", "--lr-img", "nan", "--out", out, *TINY),
                        "--lr-img", "finite")
    assert "nan" in line and not out.exists()


def test_cuda_on_the_command_line_is_one_sentence(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_sentence(invoke("distill", "--method", "dm", "--device", "cuda", "--out", tmp_path / "o", *TINY),
                 "--device", "no CUDA GPU")
    one_sentence(invoke("experts", "--device", "cuda:1", "--out", tmp_path / "e", "--quiet"), "--device")


def test_unknown_key_in_a_config_file_is_named(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("method: dm\nipc: 1\nlr_imgs: 0.5\n")
    one_sentence(invoke("distill", "--config", preset, "--out", tmp_path / "o", *TINY), "--lr-imgs", "lr_imgs")


def test_experts_take_a_config_file_too(tmp_path):
    preset = tmp_path / "experts.yaml"
    preset.write_text("num-experts: 0\n")
    one_sentence(invoke("experts", "--config", preset, "--out", tmp_path / "e", "--quiet"), "--num-experts")


def test_resume_with_other_settings_names_each_difference(tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    before = (out / SYNSET_TENSORS).read_bytes()
    line = one_sentence(invoke("distill", "--method", "dm", "--ipc", "1", "--lr-img", "0.5", "--seed", "3",
                               "--iterations", "3", "--out", out, "--resume", *TINY[:-3], "--quiet"),
                        "--lr-img was 1.0, now 0.5", "--seed was 0, now 3")
    assert "--iterations was" not in line and (out / SYNSET_TENSORS).read_bytes() == before


def test_settings_differences_show_a_setting_only_one_side_has():
    assert settings_differences({"a": 1, "iterations": 2}, {"a": 1, "iterations": 5}) == []
    assert settings_differences({"mdt": True}, {}) == ["--mdt was true, now absent"]


@pytest.mark.parametrize("damaged", [SYNSET_META, SYNSET_TENSORS])
def test_a_damaged_set_file_is_named(tmp_path, damaged):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    (out / damaged).write_bytes(b"\x00garbage")
    one_sentence(invoke("show", out), str(out / damaged), "damaged")


def test_non_finite_images_are_never_written(tmp_path):
    digits = load_dataset("digits")
    cls = get_distiller("dm")
    distiller = cls(cls.config_class.from_options(dict(ipc=1, iterations=2, width=8, batch_real=16), method="dm"),
                    digits)
    step = distiller.step

    def poisoned(iteration):
        metrics = step(iteration)
        with torch.no_grad():
            distiller.images[0, 0, 0, 0] = float("nan")
        return metrics

    distiller.step = poisoned
    with pytest.raises(FastddError, match="non-finite .* nothing of it was written"):
        run_distillation(distiller, tmp_path / "run", checkpoint_every=1, progress=False)
    assert not (tmp_path / "run" / SYNSET_TENSORS).exists()
    assert not (tmp_path / "run" / SYNSET_META).exists()


def test_a_data_root_that_does_not_exist_is_an_error_even_for_the_embedded_set(tmp_path):
    missing = tmp_path / "nowhere"
    one_sentence(invoke("distill", "--method", "dm", "--data-root", missing, "--out", tmp_path / "o", *TINY),
                 "--data-root", str(missing), "not an existing folder")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="--data-root"):
        ExpertConfig(data_root=str(missing))


def test_resume_takes_the_stored_settings_and_iterations_may_grow(tmp_path):
    options = ["--method", "dm", "--ipc", "1", "--width", "8", "--batch-real", "16", "--lr-img", "0.5", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert invoke("distill", *options, "--iterations", "4", "--out", full).exit_code == 0
    assert invoke("distill", *options, "--iterations", "2", "--out", part).exit_code == 0
    result = invoke("distill", "--out", part, "--resume", "--iterations", "4", "--quiet")
    assert result.exit_code == 0, result.output
    assert (part / SYNSET_TENSORS).read_bytes() == (full / SYNSET_TENSORS).read_bytes()
    assert json.loads((part / SYNSET_META).read_text())["hyperparameters"]["lr_img"] == 0.5
    one_sentence(invoke("distill", "--out", part, "--resume", "--method", "dsa", "--quiet"),
                 "--method dsa", "is dm")
    one_sentence(invoke("distill", "--out", tmp_path / "none", "--resume", "--quiet"), "holds no checkpoint.pt")
    one_sentence(invoke("distill", "--out", part, "--resume", "--iterations", "3", "--quiet"),
                 "--iterations 3 is below the 4 iterations")


def test_every_file_of_a_run_gets_the_permissions_open_would_give(tmp_path):
    import os
    import stat

    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert SYNSET_TENSORS in modes and set(modes.values()) == {0o666 & ~umask}, modes


def _tiny_dm(digits, **overrides):
    cls = get_distiller("dm")
    options = dict(ipc=1, iterations=4, width=8, batch_real=16, **overrides)
    return cls(cls.config_class.from_options(options, method="dm"), digits)


def test_ctrl_c_says_which_iteration_was_kept(tmp_path):
    distiller = _tiny_dm(load_dataset("digits"))
    step = distiller.step

    def interrupted_at_three(iteration):
        if iteration == 2:
            raise KeyboardInterrupt
        return step(iteration)

    distiller.step = interrupted_at_three
    with pytest.raises(Interrupted, match=r"during iteration 3; the checkpoint of iteration 2 .* --resume"):
        run_distillation(distiller, tmp_path / "run", checkpoint_every=2, progress=False)
    assert (tmp_path / "run" / SYNSET_TENSORS).exists()


def test_the_finish_line_gives_the_time_and_the_next_command(tmp_path):
    out = tmp_path / "run"
    result = invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY)
    assert result.exit_code == 0 and f"next: fastdd evaluate {out}" in result.output, result.output
    assert f"synthetic set written to {out} in " in result.output


@pytest.mark.parametrize("minutes,previous", [(1e-9, 3), (60.0, None)])
def test_checkpoints_by_time_as_well_as_by_count(tmp_path, minutes, previous):
    distiller = _tiny_dm(load_dataset("digits"))
    run_distillation(distiller, tmp_path / "run", checkpoint_every=100, checkpoint_minutes=minutes, progress=False)
    assert json.loads((tmp_path / "run" / "checkpoint.json").read_text())["iteration"] == 4
    prev = tmp_path / "run" / "checkpoint.prev.json"
    assert (json.loads(prev.read_text())["iteration"] if prev.exists() else None) == previous


def test_every_option_of_every_command_states_its_default_and_choices():
    from fastdd.commands.options import default_text
    from fastdd.config.artifacts import ExportConfig, ShowConfig
    from fastdd.config.evaluate import EvaluateConfig, InspectConfig, ReportConfig
    from fastdd.config.options import choices_of
    from fastdd.config.run import DistillRunConfig, ExpertsRunConfig

    commands = {"distill": [*METHOD_CONFIGS.values(), DistillRunConfig], "experts": [ExpertConfig, ExpertsRunConfig],
                "evaluate": [EvaluateConfig], "report": [ReportConfig], "inspect": [InspectConfig],
                "show": [ShowConfig], "export": [ExportConfig]}
    for command, configs in commands.items():
        text = " ".join(invoke(command, "--help", env={"COLUMNS": "3000"}).output.split())
        for config in configs:
            for f in option_fields(config):
                assert default_text(f), (config.__name__, f.name)
                choices = choices_of(f)
                if choices and not info_of(f).split:
                    assert "[" + "|".join(choices) + "]" in text, (command, f.name)
        assert "{synset_dir" not in text


def test_the_command_list_has_one_line_per_command():
    lines = [line for line in invoke("--help", env={"COLUMNS": "200"}).output.splitlines() if line.startswith("│ ")]
    commands = [line.split()[1] for line in lines if line[2] != " "]
    assert commands[-10:] == ["distill", "experts", "evaluate", "report", "show", "inspect", "export", "import",
                              "teacher", "info"]
    assert all(line[2] != " " for line in lines[-9:])  # no continuation lines


def test_the_set_records_where_its_data_was_read(tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    meta = json.loads((out / SYNSET_META).read_text())
    assert meta["data_root"] is None and "load_digits" in meta["data_source"]


def test_one_default_number_of_experts():
    assert ExpertConfig().num_experts == TrajectoryConfig().num_experts == 5


def test_evaluate_with_zero_runs_fails_before_any_output(tmp_path):
    out = tmp_path / "run"
    assert invoke("distill", "--method", "dm", "--ipc", "1", "--out", out, *TINY).exit_code == 0
    result = invoke("evaluate", out, "--runs", "0")
    one_sentence(result, "--runs must be at least 1")
    assert result.stdout == ""


def test_expert_training_and_reuse_are_announced_with_their_folder(tmp_path, capsys):
    from fastdd.distill.experts import ensure_experts

    config = ExpertConfig(num_experts=1, epochs=1, width=8, dsa=False)
    data = load_dataset("digits")
    folder = tmp_path / "experts"
    ensure_experts(config, data, folder, progress=True)
    assert f"training 1 expert(s) (digits, convnet, 1 epochs each) into {folder}" in capsys.readouterr().err
    ensure_experts(config, data, folder, progress=True)
    assert f"using the 1 experts cached in {folder}" in capsys.readouterr().err
