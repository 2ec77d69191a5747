"""The trust report (`fastdd report`, `fastdd.evaluate.report`): one protocol over several sets, side by side."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.errors import FastddError
from fastdd.evaluate import EvalConfig, evaluate_synthetic_set
from fastdd.evaluate.plan import EvalPlan
from fastdd.evaluate.report import distillation_seconds, prepare_report
from real_synsets import real_image_synset

runner = CliRunner()
TINY = ["--runs", "1", "--epochs", "1", "--ood-size", "50", "--quiet"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def two_sets(digits, tmp_path):
    """Two digits sets of IPC 2 (different images) in folders named alike; the first with a resumed run's log."""
    first, second = tmp_path / "a" / "dsa", tmp_path / "b" / "dsa"
    real_image_synset(digits, ipc=2, seed=1).save(first)
    real_image_synset(digits, ipc=2, seed=2).save(second)
    records = [{"iteration": 1, "loss": 1.0, "seconds": 2.0}, {"iteration": 2, "loss": 0.9, "seconds": 3.5},
               {"iteration": 3, "loss": 0.8, "seconds": 1.25}]  # resumed after iteration 2: the clock restarts
    (first / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return first, second


def _never_train(monkeypatch):
    import fastdd.evaluate.plan as plan

    monkeypatch.setattr(plan, "train_on_synthetic", lambda *a, **k: pytest.fail("a network was trained"))


def test_cli_report_tables_json_and_plots(digits, two_sets, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", *map(str, two_sets), "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert f"report written to {out / 'report.md'}" in result.output

    data = json.loads((out / "report.json").read_text())
    assert data["dataset"] == "digits" and data["format"] == "fastdd-report/1"
    assert data["protocol"]["ood"] == ["gaussian", "uniform"] and data["protocol"]["scores"] == ["msp", "energy"]
    assert data["protocol"]["calibration"] == ["none", "ts", "mts"] and data["protocol"]["runs"] == 1
    assert {"platform", "cpu_count", "torch"} <= set(data["machine"])
    first, second = data["sets"]
    assert [first["name"], second["name"]] == ["dsa", "dsa-2"]  # folder names, deduplicated
    assert first["distill_seconds"] == pytest.approx(4.75) and second["distill_seconds"] is None
    assert first["size_bytes"] == (two_sets[0] / "synset.safetensors").stat().st_size
    assert (first["method"], first["ipc"], first["images"], first["outlier_images"]) == ("real", 2, 20, 0)
    assert (first["outliers"], first["robust"], first["mdt"], first["notes"]) == ("none", False, False, [])

    # The report adds nothing random: each set's results are those of evaluate_synthetic_set with the same options.
    config = EvalConfig(runs=1, epochs=1)
    for entry, folder in zip(data["sets"], two_sets):
        from fastdd.io import SyntheticSet

        direct = evaluate_synthetic_set(
            SyntheticSet.load(folder), load_dataset("digits"), models=["convnet"], config=config,
            ood=["gaussian", "uniform"], scores=["msp", "energy"], ood_size=50,
            robustness=["cluster_min", "cluster_mean", "noise", "blur", "invert"], calibration=["none", "ts", "mts"],
        )
        reported = {k: v for k, v in entry["results"].items() if k != "plots"}
        assert reported == json.loads(json.dumps(direct))

    markdown = (out / "report.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == "# Trust report: digits"
    header = next(i for i, line in enumerate(lines) if line.startswith("| set | acc %"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    assert columns == ["set", "acc %", "AUROC msp", "FPR95 msp ↓", "AUROC energy", "FPR95 energy ↓", "cluster_min",
                       "noise", "blur", "invert", "ECE raw ↓", "ECE TS ↓", "ECE MTS ↓", "size", "distillation time"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2: header + 4]]
    assert [row[0] for row in rows] == ["dsa", "dsa-2"]
    acc = first["results"]["models"]["convnet"]["acc"]
    assert rows[0][1] == f"{acc['mean']:.2f} ± {acc['std']:.2f}" and rows[0][-1] == "4.8 s" and rows[1][-1] == "–"
    assert "### convnet, msp: per OOD set" in markdown and "| set | gaussian AUROC | gaussian FPR95 ↓ |" in markdown

    assert data["plots"][0] == "summary_convnet.png"
    assert "plots/dsa/ood_convnet_energy.png" in data["plots"] and "plots/dsa-2/calibration_convnet_ts.png" in data[
        "plots"]
    for relative in data["plots"]:
        assert (out / relative).stat().st_size > 1000, relative
        assert f"]({relative})" in markdown
    assert sorted(p.name for p in out.iterdir()) == ["plots", "report.json", "report.md", "summary_convnet.png"]

    # An existing report is kept unless --overwrite: one sentence, nothing trained or touched.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = runner.invoke(app, ["report", *map(str, two_sets), "--out", str(out), *TINY])
    assert again.exit_code != 0 and "Traceback" not in again.output
    assert "is not empty; pass --overwrite" in again.output and len(again.output.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # --overwrite replaces the whole earlier report, its per-set plot folders included.
    (out / "notes.txt").write_text("mine")
    smaller = ["--no-robustness", "--calibration", "none", "--score", "msp", "--overwrite"]
    replaced = runner.invoke(app, ["report", str(two_sets[1]), "--out", str(out), *TINY, *smaller])
    assert replaced.exit_code == 0, replaced.output
    data = json.loads((out / "report.json").read_text())
    assert [entry["name"] for entry in data["sets"]] == ["dsa"] and data["protocol"]["robustness"] == []
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["dsa"]
    assert sorted(p.name for p in (out / "plots" / "dsa").iterdir()) == [
        "calibration_convnet_none.png", "max_logits_convnet.png", "ood_convnet_msp.png"]
    assert (out / "notes.txt").read_text() == "mine" and "cluster_min" not in (out / "report.md").read_text()


@pytest.mark.parametrize("case", ["different datasets", "missing folder", "bad score", "bad model", "bad holdout"])
def test_cli_report_errors_are_one_sentence_before_any_training(digits, two_sets, tmp_path, monkeypatch, case):
    _never_train(monkeypatch)
    sets, extra = [str(p) for p in two_sets], []
    if case == "different datasets":
        other = real_image_synset(digits, ipc=2)
        other.meta["dataset"] = "mnist"
        other.save(tmp_path / "mnist-set")
        sets.append(str(tmp_path / "mnist-set"))
        expected = "come from different datasets: dsa (digits), dsa-2 (digits), mnist-set (mnist)"
    elif case == "missing folder":
        sets.append(str(tmp_path / "nowhere"))
        expected = "the synthetic set folder"
    elif case == "bad score":
        extra, expected = ["--score", "msp,odin"], "--score must be one of msp, mls, energy, gen, got 'odin'"
    elif case == "bad model":
        extra, expected = ["--models", "convnet,lenet9"], "--models must be one of convnet"
    else:
        extra, expected = ["--ood", "gaussian,holdout:10"], "holdout:10 is out of range"
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", *sets, "--out", str(out), *TINY, *extra])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.startswith("error: ") and expected in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_ts_is_skipped_with_a_note_for_a_set_with_one_image_per_class(digits, tmp_path, monkeypatch):
    _never_train(monkeypatch)
    sets = {"two": real_image_synset(digits, ipc=2), "one": real_image_synset(digits, ipc=1)}
    plan = prepare_report(sets, out=tmp_path / "r", config=EvalConfig(runs=1, epochs=1))
    assert [s.calibration for s in plan.sets] == [("none", "ts", "mts"), ("none", "mts")]
    assert plan.sets[0].info["notes"] == [] and "TS skipped: class 0 has a single" in plan.sets[1].info["notes"][0]
    assert plan.total_epochs == 2 + 1  # the TS network of the IPC-2 set, none for the IPC-1 set
    assert plan.sets[1].info["path"] is None and plan.sets[1].info["size_bytes"] > 10 * 64 * 4
    assert not (tmp_path / "r").exists()
    with pytest.raises(FastddError, match="needs at least one OOD set"):
        prepare_report(sets, out=tmp_path / "r", ood=" , ")


def test_a_failed_report_leaves_the_folder_as_it_was(digits, tmp_path, monkeypatch):
    sets = {"a": real_image_synset(digits, ipc=2)}
    options = dict(config=EvalConfig(runs=1, epochs=1), robustness=None, calibration="none")
    fresh = prepare_report(sets, out=tmp_path / "new", **options)
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.md").write_text("earlier report")
    replacing = prepare_report(sets, out=old, overwrite=True, **options)

    def interrupted(plan, on_epoch=None):  # a first plot written, then Ctrl-C
        plots = Path(plan.options.plots)
        plots.mkdir(parents=True)
        (plots / "partial.png").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(EvalPlan, "run", interrupted)
    for plan in (fresh, replacing):
        with pytest.raises(KeyboardInterrupt):
            plan.run()
    assert not (tmp_path / "new").exists()
    assert [p.name for p in old.iterdir()] == ["report.md"] and (old / "report.md").read_text() == "earlier report"


def test_distillation_seconds_adds_up_resumed_segments(tmp_path):
    assert distillation_seconds(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"seconds": 1.5}\n{"seconds": 4}\nnot json\n{"seconds": 2}\n{"loss": 1}\n')
    assert distillation_seconds(tmp_path) == pytest.approx(6.0)
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1}\n')
    assert distillation_seconds(tmp_path) is None
