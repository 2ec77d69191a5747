"""fastdd import / export: round trips, foreign layouts written here and read back, the tools' conventions, refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import fastdd.interop.importing as importing
from fastdd.cli import app
from fastdd.data import load_dataset
from fastdd.data.dataset import ImageDataset
from fastdd.data.registry import get_spec
from fastdd.errors import FastddError, UnsafeFileError
from fastdd.evaluate import evaluate_synthetic_set
from fastdd.evaluate.protocol import dataset_for_synset
from fastdd.interop import export_synthetic_set, import_synthetic_set
from fastdd.interop.conventions import check_normalization, renormalized
from fastdd.interop.exporting import LOGIT_FLOOR
from fastdd.io import SyntheticSet, synset_unit_images
from real_synsets import real_image_synset

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _soft(labels: torch.Tensor, classes: int, seed: int = 0) -> torch.Tensor:
    """Soft labels peaked on ``labels``, one exact zero per row (as a softmax underflow gives)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(labels), classes, generator=g) + 4 * torch.nn.functional.one_hot(labels, classes)
    probs = torch.softmax(logits, 1)
    probs[torch.arange(len(labels)), (labels + 1) % classes] = 0.0
    return probs / probs.sum(1, keepdim=True)


def _digits_set(digits, *, soft=False, lr=None, ipc=2) -> SyntheticSet:
    synset = real_image_synset(digits, ipc=ipc)
    synset.meta.update(num_classes=10, class_names=list(digits.class_names), zca=False)
    if soft:
        synset.soft_labels = _soft(synset.labels, 10)
    if lr is not None:
        synset.syn_lr = torch.tensor(lr)
    return synset


def fake_cifar(name: str = "cifar100", classes: int = 4, size: int = 6) -> ImageDataset:
    """A tiny three-channel dataset named like a CIFAR set (no files needed), with that set's registered statistics."""
    spec = get_spec(name)
    g = torch.Generator().manual_seed(3)
    unit = torch.rand(8 * classes, 3, size, size, generator=g)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    images = (unit - mean) / std
    labels = torch.arange(classes).repeat_interleave(8)
    return ImageDataset(name=name, train_images=images, train_labels=labels, test_images=images[:classes],
                        test_labels=labels[:classes], num_classes=classes,
                        class_names=[f"c{i}" for i in range(classes)],
                        mean=spec.mean, std=spec.std, zca=None, dsa_strategy="color_crop_cutout_flip_scale_rotate")


def _cifar_set(data: ImageDataset, *, soft=False, lr=None) -> SyntheticSet:
    idx = torch.cat([torch.nonzero(data.train_labels == c).flatten()[:2] for c in range(data.num_classes)])
    synset = SyntheticSet(images=data.train_images[idx].clone() * 1.3, labels=data.train_labels[idx].clone(), meta={
        "dataset": data.name, "method": "dsa", "ipc": 2, "num_classes": data.num_classes, "mean": list(data.mean),
        "std": list(data.std), "zca": False, "class_names": data.class_names})
    if soft:
        synset.soft_labels = _soft(synset.labels, data.num_classes)
    if lr is not None:
        synset.syn_lr = torch.tensor(lr)
    return synset


@pytest.fixture
def cifar100(monkeypatch):
    data = fake_cifar("cifar100")
    monkeypatch.setattr(importing, "load_dataset", lambda name, **kw: data)
    return data


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("lr", [None, 0.0123])
def test_mtt_round_trip_keeps_images_labels_soft_labels_and_lr(digits, tmp_path, soft, lr):
    synset = _digits_set(digits, soft=soft, lr=lr)
    written = export_synthetic_set(synset, tmp_path / "out", "mtt")
    names = {p.name for p in written}
    assert ("lr_best.pt" in names) == (lr is not None)  # an unlearned lr is never invented
    back = import_synthetic_set("mtt", [tmp_path / "out"], dataset="digits")
    assert torch.equal(back.images, synset.images) and torch.equal(back.labels, synset.labels)
    if soft:
        torch.testing.assert_close(back.soft_labels, synset.soft_labels, atol=1e-6, rtol=0)
    else:
        assert back.soft_labels is None
    assert (back.syn_lr is None) if lr is None else float(back.syn_lr) == pytest.approx(lr)
    assert back.meta["ipc"] == 2 and back.meta["method"] == "imported"
    note = json.loads((tmp_path / "out" / "export.json").read_text())
    assert note["labels"] == ("soft, as logits" if soft else "hard class indices, class-major")


def test_fastdd_and_imagefolder_round_trips(digits, tmp_path):
    synset = _digits_set(digits, ipc=3)
    export_synthetic_set(synset, tmp_path / "copy", "fastdd")
    copy = SyntheticSet.load(tmp_path / "copy")
    assert torch.equal(copy.images, synset.images) and torch.equal(copy.labels, synset.labels)
    export_synthetic_set(synset, tmp_path / "pngs", "imagefolder")
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir())[:2] == ["000", "001"]
    back = import_synthetic_set("imagefolder", [tmp_path / "pngs"], dataset="digits")
    assert torch.equal(back.labels, synset.labels)
    # 8-bit PNGs: at most half a grey level apart (the real images are inside [0, 1], so nothing is clipped)
    assert (synset_unit_images(back) - synset_unit_images(synset)).abs().max() <= 0.5 / 255 + 1e-6


def test_cifar100_is_renormalised_with_cifar10_statistics_for_mtt_and_back(cifar100, tmp_path):
    synset = _cifar_set(cifar100, soft=True, lr=0.02)
    export_synthetic_set(synset, tmp_path / "m", "mtt")
    stored = torch.load(tmp_path / "m" / "images_best.pt", weights_only=True)
    c10, c100 = get_spec("cifar10"), get_spec("cifar100")
    unit = synset.images * torch.tensor(c100.std).view(1, 3, 1, 1) + torch.tensor(c100.mean).view(1, 3, 1, 1)
    expected = (unit - torch.tensor(c10.mean).view(1, 3, 1, 1)) / torch.tensor(c10.std).view(1, 3, 1, 1)
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "m" / "export.json").read_text())["normalization"]["name"] == "cifar10"
    back = import_synthetic_set("mtt", [tmp_path / "m"], dataset="cifar100", normalization="cifar10")
    torch.testing.assert_close(back.images, synset.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.soft_labels, synset.soft_labels, atol=1e-6, rtol=0)


def test_ddranking_profile_meets_its_loader_conventions(cifar100, tmp_path):
    """DD-Ranking loads images [N, 3, H, W], soft labels as logits it applies a softmax to, hard labels class-major
    ([0]*ipc, [1]*ipc, ...) by default, and searches its own lr when none is given."""
    synset = _cifar_set(cifar100, soft=True)
    written = {p.name for p in export_synthetic_set(synset, tmp_path / "d", "ddranking")}
    assert written == {"images.pt", "labels.pt", "export.json"}  # no lr.pt: the set learned none
    images = torch.load(tmp_path / "d" / "images.pt", weights_only=True)
    logits = torch.load(tmp_path / "d" / "labels.pt", weights_only=True)
    assert images.shape == (8, 3, 6, 6) and images.dtype == torch.float32
    assert logits.shape == (8, 4) and logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    torch.testing.assert_close(torch.softmax(logits.double(), 1), synset.soft_labels.double(), atol=1e-6, rtol=0)
    assert float(logits.min()) == pytest.approx(float(np.log(LOGIT_FLOOR)), rel=1e-5)  # a zero stays ~0, not -inf
    hard = _cifar_set(cifar100)
    export_synthetic_set(hard, tmp_path / "h", "ddranking")
    labels = torch.load(tmp_path / "h" / "labels.pt", weights_only=True)
    default = torch.tensor(np.array([np.ones(2) * i for i in range(4)]), dtype=torch.long).view(-1)
    assert labels.dtype == torch.int64 and torch.equal(labels, default)
    back = import_synthetic_set("ddranking", [tmp_path / "d"], dataset="cifar100", normalization="cifar10")
    torch.testing.assert_close(back.images, synset.images, atol=1e-5, rtol=1e-5)


def test_dc_bench_profile_writes_dcs_res_file(tmp_path, monkeypatch):
    data = fake_cifar("cifar10")
    monkeypatch.setattr(importing, "load_dataset", lambda name, **kw: data)
    synset = _cifar_set(data)
    export_synthetic_set(synset, tmp_path / "b", "dc-bench")
    payload = torch.load(tmp_path / "b" / "res_DSA_CIFAR10_ConvNet_2ipc.pt", weights_only=True)
    images, labels = payload["data"][-1]  # DC-BENCH's DC loader reads the last experiment
    assert torch.equal(images, synset.images) and torch.equal(labels, synset.labels)
    back = import_synthetic_set("dc", [tmp_path / "b" / "res_DSA_CIFAR10_ConvNet_2ipc.pt"], dataset="cifar10")
    assert torch.equal(back.images, synset.images)


# --- sets written in foreign layouts by the test itself -------------------------------------------------------------


def _normalised(digits, ipc=2, seed=5):
    """Real digits images (model space = DC's normalisation) with shuffled, explicit labels."""
    synset = real_image_synset(digits, ipc=ipc, seed=seed)
    order = torch.randperm(len(synset.labels), generator=torch.Generator().manual_seed(seed))
    return synset.images[order], synset.labels[order]


def test_foreign_layouts_are_imported_and_evaluated(digits, tmp_path):
    images, labels = _normalised(digits)
    expected_order = torch.sort(labels, stable=True).indices
    # DC: res_*.pt with one (images, labels) pair per experiment
    torch.save({"data": [[images * 0, labels], [images, labels]], "accs_all_exps": {"ConvNet": [0.5]}},
               tmp_path / "res_DC_digits.pt")
    # mtt folder with descendants' names (image_syn.pt, syn_lr.pt)
    (tmp_path / "datm").mkdir()
    torch.save(images, tmp_path / "datm" / "image_syn.pt")
    torch.save(labels.float(), tmp_path / "datm" / "label_syn.pt")
    torch.save(torch.tensor([0.03]), tmp_path / "datm" / "syn_lr.pt")
    # DD-Ranking's names: soft labels as logits, images in a folder
    (tmp_path / "ddr").mkdir()
    torch.save(images, tmp_path / "ddr" / "images.pt")
    torch.save(4.0 * torch.nn.functional.one_hot(labels, 10).float(), tmp_path / "ddr" / "labels.pt")
    # plain tensors: .npy images in [0, 1], safetensors labels
    unit = images * digits.std[0] + digits.mean[0]
    np.save(tmp_path / "images.npy", unit.numpy())
    save_file({"labels": labels}, tmp_path / "labels.safetensors")
    # image folder named by class names
    for i, (image, label) in enumerate(zip(unit, labels.tolist())):
        folder = tmp_path / "pngs" / digits.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0].clamp(0, 1) * 255).round().byte().numpy()).save(folder / f"{i:03d}.png")

    sets = {
        "dc": import_synthetic_set("dc", [tmp_path / "res_DC_digits.pt"], dataset="digits"),
        "mtt": import_synthetic_set("mtt", [tmp_path / "datm"], dataset="digits"),
        "ddranking": import_synthetic_set("ddranking", [tmp_path / "ddr"], dataset="digits"),
        "tensors": import_synthetic_set("tensors", [tmp_path / "images.npy", tmp_path / "labels.safetensors"],
                                        dataset="digits", normalization="none"),
        "imagefolder": import_synthetic_set("imagefolder", [tmp_path / "pngs"], dataset="digits"),
    }
    for name, synset in sets.items():
        assert torch.equal(synset.labels, labels[expected_order]), name
        tolerance = 0.5 / 255 / digits.std[0] + 1e-5 if name == "imagefolder" else 1e-5
        torch.testing.assert_close(synset.images, images[expected_order], atol=tolerance, rtol=0, msg=name)
        assert synset.meta["imported"]["reordered_to_class_major"] is (name != "imagefolder")  # folders are sorted
    assert float(sets["mtt"].syn_lr) == pytest.approx(0.03) and sets["dc"].meta["imported"]["experiment"] == 1
    assert sets["dc"].meta["imported"]["files"]["images"]["sha256"]
    torch.testing.assert_close(sets["ddranking"].soft_labels.sum(1), torch.ones(20))
    for name, synset in sets.items():
        synset.save(tmp_path / f"imported-{name}")
        loaded = SyntheticSet.load(tmp_path / f"imported-{name}")
        result = evaluate_synthetic_set(loaded, dataset_for_synset(loaded), config=_tiny_protocol())
        assert 0 <= result["models"]["convnet"]["acc"]["mean"] <= 100 and result["method"] == "imported", name


def _tiny_protocol():
    from fastdd.config.evaluate import EvalConfig

    return EvalConfig(runs=1, epochs=2)


def test_class_major_default_and_probabilities(digits, tmp_path):
    images, labels = _normalised(digits)
    order = torch.sort(labels, stable=True).indices
    torch.save(images[order], tmp_path / "images.pt")
    synset = import_synthetic_set("tensors", [tmp_path / "images.pt"], dataset="digits")
    assert torch.equal(synset.labels, torch.arange(10).repeat_interleave(2))
    probs = _soft(labels[order], 10)
    torch.save(probs, tmp_path / "probs.pt")
    synset = import_synthetic_set("tensors", [tmp_path / "images.pt", tmp_path / "probs.pt"], dataset="digits",
                                  soft_labels="probs")
    torch.testing.assert_close(synset.soft_labels, probs)
    with pytest.warns(UserWarning, match="look like probabilities"):
        import_synthetic_set("tensors", [tmp_path / "images.pt", tmp_path / "probs.pt"], dataset="digits")


# --- refusals: one sentence each -----------------------------------------------------------------------------------


def _write(tmp_path, name, value):
    torch.save(value, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("case, message", [
    ("channels", "3 channel"),
    ("size", "8x8"),
    ("range", "outside the dataset's classes"),
    ("nan", "NaN or infinite"),
    ("count", "class-major"),
    ("fraction", "not whole numbers"),
    ("probs", "not probabilities"),
    ("pixels", "all lie in \\[0, 1\\]"),
    ("scale", "normalised some other way"),
    ("lr", "positive finite"),
    ("missing class", "no image of class"),
])
def test_bad_sets_are_refused_with_one_sentence(digits, tmp_path, case, message):
    images, labels = _normalised(digits)
    kwargs = {"dataset": "digits"}
    files = [images, labels]
    if case == "channels":
        files[0] = images.repeat(1, 3, 1, 1)
    elif case == "size":
        kwargs["dataset"] = "fashion-mnist"
    elif case == "range":
        files[1] = labels + 5
    elif case == "nan":
        files[0] = images.clone()
        files[0][0, 0, 0, 0] = float("nan")
    elif case == "count":
        files = [images[:-1]]
    elif case == "fraction":
        files[1] = labels.float() + 0.5
    elif case == "probs":
        files[1] = torch.randn(len(labels), 10)
        kwargs["soft_labels"] = "probs"
    elif case == "pixels":
        files[0] = images * digits.std[0] + digits.mean[0]
        files[0] = files[0].clamp(0, 1)
    elif case == "scale":
        files[0] = images * 40
    elif case == "lr":
        files.append(torch.tensor(-0.01))
    elif case == "missing class":
        keep = labels != 3
        files = [images[keep], labels[keep]]
    paths = [_write(tmp_path, f"f{i}.pt", t) for i, t in enumerate(files)]
    with pytest.raises(FastddError, match=message) as info:
        import_synthetic_set("tensors", paths, **kwargs)
    assert "\n" not in str(info.value)


def test_pickled_objects_are_never_unpickled(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(UnsafeFileError):
        import_synthetic_set("dc", [tmp_path / "evil.pt"], dataset="digits")
    (tmp_path / "damaged.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(FastddError, match="damaged") as info:
        import_synthetic_set("tensors", [tmp_path / "damaged.pt"], dataset="digits")
    assert not isinstance(info.value, UnsafeFileError) and "weights_only" not in str(info.value)


def test_targets_refuse_what_they_cannot_take(digits, cifar100, tmp_path):
    with pytest.raises(FastddError, match="RGB images only"):
        export_synthetic_set(_digits_set(digits), tmp_path / "x", "ddranking")
    with pytest.raises(FastddError, match="hard labels only"):
        export_synthetic_set(_cifar_set(cifar100, soft=True), tmp_path / "x", "dc-bench")
    with pytest.raises(FastddError, match="not digits"):
        export_synthetic_set(_digits_set(digits), tmp_path / "x", "dc-bench")
    assert not (tmp_path / "x").exists()


def test_normalization_check_measures_in_unit_space():
    stats = ((0.5,), (0.25,))
    normalised = (torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1 - 0.5) / 0.25
    measured = check_normalization(normalised, "dataset", stats)
    assert measured["unit_share_in_band"] == 1.0
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(renormalized(renormalized(x, stats, ((0.1,), (0.3,))).double(), ((0.1,), (0.3,)), stats),
                               x.float(), atol=1e-5, rtol=0)
    assert torch.equal(renormalized(x.float(), stats, stats), x.float())


# --- command line -------------------------------------------------------------------------------------------------


def test_cli_export_import_evaluate_and_refusals(digits, tmp_path):
    synset = _digits_set(digits, soft=True)
    synset.meta.update(image_shape=[1, 8, 8])
    synset.save(tmp_path / "set")
    result = runner.invoke(app, ["export", str(tmp_path / "set"), "--format", "mtt", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    args = ["import", str(tmp_path / "m"), "--format", "mtt", "--dataset", "digits", "--out", str(tmp_path / "imp")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "imported 20 images of digits (IPC 2, with soft labels)" in result.output
    assert (tmp_path / "imp" / "synset.png").exists()
    before = (tmp_path / "imp" / "synset.safetensors").read_bytes()
    result = runner.invoke(app, args)  # nothing already written is lost
    assert result.exit_code == 2 and "already holds a synthetic set" in result.output
    assert (tmp_path / "imp" / "synset.safetensors").read_bytes() == before
    result = runner.invoke(app, [*args, "--overwrite", "--zca", "--normalization", "none"])
    assert result.exit_code == 2 and "--normalization" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "imp"), "--runs", "1", "--epochs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", str(tmp_path / "set"), "--format", "ddranking", "--out",
                                 str(tmp_path / "d")])
    assert result.exit_code == 2 and "RGB images only" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "set"), "--format", "fastdd"])
    assert result.exit_code == 2 and "give --out" in result.output
