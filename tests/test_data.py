"""fastdd.data: registry, loaders (on tiny files written here), normalisation, ZCA and per-class indexing."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdd.data import DATASETS, ZCA, ClassIndex, ImageDataset, load_dataset
from fastdd.data import mnist as mnist_module
from fastdd.data.digits import read_digits, stratified_split
from fastdd.data.idx import read_idx
from fastdd.errors import FastddError

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


# --------------------------------------------------------------------------------------------------------- helpers
def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> None:
    """An idx file written from the format's definition (header, big-endian sizes, big-endian values)."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_mnist_folder(folder: Path, rng: np.random.Generator, *, n_train=50, n_test=20, gz=(True, False, True, False)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for (stem, array), compress in zip(arrays.items(), gz):
        write_idx(folder / (stem + ".gz" if compress else stem), array, compress=compress)
    return arrays


def normalise(unit: np.ndarray, mean, std) -> torch.Tensor:
    """Reference normalisation in float64: [N, C, H, W] [0,1] pixels -> model space."""
    m = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    return torch.from_numpy((unit.astype(np.float64) - m) / s)


def write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def exists_only(fpath, md5=None):
    """Stand-in for torchvision's check_integrity: fake files cannot match the official MD5 sums."""
    return Path(fpath).is_file()


# ---------------------------------------------------------------------------------------------------------- digits
def test_registry_names():
    assert DATASETS == ("digits", "fashion-mnist", "mnist", "cifar10", "cifar100", "svhn", "imagefolder")


def test_digits_matches_scikit_learn_and_split():
    from sklearn.datasets import load_digits as sklearn_digits

    reference = sklearn_digits()
    data = load_dataset("digits")
    assert data.name == "digits" and data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert data.train_images.shape == (1438, 1, 8, 8) and data.test_images.shape == (359, 1, 8, 8)
    assert data.train_images.dtype == torch.float32 and data.train_labels.dtype == torch.int64
    assert data.channels == 1 and data.image_size == (8, 8)
    assert data.dsa_strategy == "color_crop_cutout_scale_rotate" and data.zca is None

    train_idx, test_idx = stratified_split(torch.from_numpy(reference.target), 0.2, 0)
    # Each split is the scikit-learn data at the split's indices, scaled by 1/16 and normalised.
    splits = [(data.train_images, data.train_labels, train_idx), (data.test_images, data.test_labels, test_idx)]
    for images, labels, idx in splits:
        expected = normalise(reference.images[idx.numpy()][:, None] / 16.0, data.mean, data.std)
        torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)
        assert torch.equal(labels, torch.from_numpy(reference.target[idx.numpy()]).long())

    # Stratified: every class puts round(0.2 * n_c) of its images in the test split.
    full_counts = np.bincount(reference.target, minlength=10)
    assert torch.equal(torch.bincount(data.test_labels, minlength=10), torch.tensor(np.round(0.2 * full_counts)).long())
    assert torch.equal(
        torch.bincount(data.train_labels, minlength=10) + torch.bincount(data.test_labels, minlength=10),
        torch.from_numpy(full_counts),
    )


def test_digits_normalisation_stats():
    data = load_dataset("digits")
    model = data.train_images.double()
    assert abs(float(model.mean())) < 1e-3
    assert abs(float(model.std(correction=0)) - 1) < 1e-3
    # The registered constants are the statistics of the [0, 1] training pixels.
    unit = data.to_unit_range(data.train_images).double()
    assert data.mean[0] == pytest.approx(float(unit.mean()), abs=5e-5)
    assert data.std[0] == pytest.approx(float(unit.std(correction=0)), abs=5e-5)


def test_digits_split_is_deterministic_and_partitions():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    _, labels = read_digits()
    train, test = stratified_split(labels, 0.2, 0)
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(labels.numel()))
    other_train, _ = stratified_split(labels, 0.2, 1)
    assert not torch.equal(train, other_train)


def test_image_size_resizes():
    data = load_dataset("digits", image_size=16)
    assert data.train_images.shape == (1438, 1, 16, 16) and data.image_size == (16, 16)
    unit = data.to_unit_range(data.train_images)
    assert unit.min() >= 0 and unit.max() <= 1


# ------------------------------------------------------------------------------------------- normalisation and ZCA
def test_model_space_round_trip(generator):
    data = load_dataset("digits")
    x = torch.rand(7, 1, 8, 8, generator=generator)
    torch.testing.assert_close(data.to_unit_range(data.to_model_space(x)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(data.to_model_space(x), (x - data.mean[0]) / data.std[0])
    far = torch.full((2, 1, 8, 8), 100.0)
    assert torch.equal(data.to_unit_range(far), torch.ones_like(far))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        data.to_model_space(torch.rand(2, 3, 8, 8))


def test_zca_dataset_round_trip(generator):
    data = load_dataset("digits", zca=True)
    assert isinstance(data.zca, ZCA)
    unit = read_digits()[0]
    train_idx, test_idx = stratified_split(read_digits()[1], 0.2, 0)
    # Model space is the whitening fitted on the [0, 1] training images, with no mean/std step.
    reference = ZCA().fit(unit[train_idx])
    torch.testing.assert_close(data.test_images, reference(unit[test_idx]), atol=1e-5, rtol=0)
    x = unit[test_idx[:9]]
    torch.testing.assert_close(data.to_unit_range(data.to_model_space(x)), x, atol=1e-5, rtol=0)


def correlated_images(generator, n=600):
    """[n, 3, 2, 2] float64 images whose covariance eigenvalues span 1e-3..10 (around eps = 0.1), rotated."""
    scales = torch.logspace(-1.5, 0.5, 12, dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64)).Q
    z = torch.randn(n, 12, generator=generator, dtype=torch.float64) * scales
    return (0.5 + z @ mixing.T).reshape(n, 3, 2, 2)


def covariance(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    centred = flat - flat.mean(0)
    return centred.T @ centred / (flat.shape[0] - 1)


def test_zca_matches_eigendecomposition_oracle(generator):
    x = correlated_images(generator)
    zca = ZCA(eps=0.1).fit(x)
    s, u = torch.linalg.eigh(covariance(x))
    expected = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    torch.testing.assert_close(zca.transform_matrix, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(zca.inverse_matrix, torch.linalg.inv(expected), atol=1e-9, rtol=1e-9)

    white = zca(x)
    # Whitening maps covariance eigenvalues s to s / (s + eps): directions with s >> eps get unit variance and the
    # spread of the spectrum shrinks from about 1e4 to about 1e2.
    white_eigs = torch.linalg.eigvalsh(covariance(white))
    torch.testing.assert_close(white_eigs, (s / (s + 0.1)).sort().values, atol=1e-9, rtol=1e-7)
    assert s.max() / s.min() > 3e3 and white_eigs.max() / white_eigs.min() < 0.02 * (s.max() / s.min())
    assert white_eigs.max() > 0.97 and white_eigs.max() < 1
    white_mean = white.reshape(len(x), -1).mean(0)
    torch.testing.assert_close(white_mean, torch.zeros(12, dtype=torch.float64), atol=1e-12, rtol=0)


def test_zca_inverse_and_tensors_round_trip(generator):
    x = correlated_images(generator).float()
    zca = ZCA().fit(x)
    assert zca.transform_matrix.dtype == torch.float32
    torch.testing.assert_close(zca.inverse(zca(x)), x, atol=1e-5, rtol=0)
    tensors = zca.state_tensors()
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes == {"zca_mean": (1, 12), "zca_transform": (12, 12), "zca_inverse": (12, 12)}
    rebuilt = ZCA.from_tensors(**tensors)
    assert torch.equal(rebuilt(x), zca(x)) and torch.equal(rebuilt.inverse(x), zca.inverse(x))
    with pytest.raises(ValueError, match="12 features"):
        zca(torch.rand(2, 1, 8, 8))
    with pytest.raises(RuntimeError, match="not fitted"):
        ZCA()(x)


def test_zca_tensors_survive_safetensors(tmp_path, generator):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    x = correlated_images(generator).float()
    zca = ZCA().fit(x)
    safetensors_torch.save_file(zca.state_tensors(), tmp_path / "zca.safetensors")
    rebuilt = ZCA.from_tensors(**safetensors_torch.load_file(tmp_path / "zca.safetensors"))
    assert torch.equal(rebuilt(x), zca(x))


# ------------------------------------------------------------------------------------------------------ ClassIndex
def test_class_index_matches_brute_force(generator):
    labels = torch.randint(0, 6, (500,), generator=generator)
    labels[labels == 4] = 5  # class 4 is empty
    index = ClassIndex(labels, 7)
    assert torch.equal(index.counts, torch.tensor([(labels == c).sum() for c in range(7)]))
    for c in range(7):
        assert torch.equal(index.indices(c), torch.nonzero(labels == c).flatten())
    assert index.indices(4).numel() == 0 and index.indices(6).numel() == 0


def test_class_index_sample(generator):
    labels = torch.randint(0, 3, (300,), generator=generator)
    index = ClassIndex(labels, 3)
    members = set(torch.nonzero(labels == 1).flatten().tolist())
    draw = index.sample(1, 40, torch.Generator().manual_seed(5))
    assert draw.dtype == torch.int64 and draw.shape == (40,)
    assert len(set(draw.tolist())) == 40 and set(draw.tolist()) <= members
    assert torch.equal(draw, index.sample(1, 40, torch.Generator().manual_seed(5)))
    assert not torch.equal(draw, index.sample(1, 40, torch.Generator().manual_seed(6)))
    everything = index.sample(1, len(members), generator)
    assert sorted(everything.tolist()) == sorted(members)
    assert index.sample(1, 0, generator).numel() == 0
    with pytest.raises(ValueError, match="cannot draw"):
        index.sample(1, len(members) + 1, generator)
    with pytest.raises(ValueError, match="out of range"):
        index.indices(3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ClassIndex(torch.tensor([0, 3]), 3)


def test_class_index_is_cached():
    data = load_dataset("digits")
    index = data.class_index()
    assert index is data.class_index()
    assert torch.equal(index.counts, torch.bincount(data.train_labels, minlength=10))


def test_image_dataset_validates_labels():
    images = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="labels must lie"):
        ImageDataset(
            name="x", train_images=images, train_labels=torch.tensor([0, 1, 2]), test_images=images,
            test_labels=torch.tensor([0, 1, 1]), num_classes=2, class_names=["a", "b"], mean=(0.5,), std=(0.5,),
            zca=None, dsa_strategy="",
        )


# ----------------------------------------------------------------------------------------- idx / (Fashion-)MNIST
def test_read_idx_plain_gzip_and_wide_types(tmp_path, generator):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4) * 1_000_003
    write_idx(tmp_path / "a.idx", values, compress=False)
    write_idx(tmp_path / "a.idx.gz", values, compress=True)
    for name in ("a.idx", "a.idx.gz"):
        out = read_idx(tmp_path / name)
        assert out.dtype == torch.int32 and torch.equal(out, torch.from_numpy(values))
    floats = np.linspace(-1, 1, 10, dtype=np.float32)
    write_idx(tmp_path / "f.idx", floats, compress=False)
    assert torch.equal(read_idx(tmp_path / "f.idx"), torch.from_numpy(floats))

    (tmp_path / "short.idx").write_bytes((tmp_path / "a.idx").read_bytes()[:-3])
    with pytest.raises(FastddError, match="short.idx holds"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "junk.idx").write_bytes(b"hello world")
    with pytest.raises(FastddError, match="not an idx file"):
        read_idx(tmp_path / "junk.idx")


def test_fashion_mnist_from_synthetic_idx_folder(tmp_path):
    arrays = write_mnist_folder(tmp_path, np.random.default_rng(0))
    data = load_dataset("fashion-mnist", data_root=tmp_path)
    assert data.name == "fashion-mnist" and data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.mean == (FASHION_MEAN,) and data.std == (FASHION_STD,)
    assert data.dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    assert data.source == str(tmp_path.resolve())  # provenance: the folder actually read
    expected = normalise(arrays["train-images-idx3-ubyte"][:, None] / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.train_images.double(), expected, atol=1e-5, rtol=0)
    expected = normalise(arrays["t10k-images-idx3-ubyte"][:, None] / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.test_images.double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(data.train_labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(data.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def test_mnist_from_torchvision_raw_layout(tmp_path):
    arrays = write_mnist_folder(tmp_path / "MNIST" / "raw", np.random.default_rng(1), gz=(False,) * 4)
    data = load_dataset("mnist", data_root=tmp_path)
    assert data.source == str((tmp_path / "MNIST" / "raw").resolve())
    assert data.mean == (0.1307,) and data.std == (0.3081,) and "flip" not in data.dsa_strategy
    assert data.train_images.shape == (50, 1, 28, 28) and data.test_images.shape == (20, 1, 28, 28)
    unit = data.to_unit_range(data.train_images)
    expected = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float()[:, None]
    torch.testing.assert_close(unit * 255, expected, atol=1e-3, rtol=0)


def test_missing_idx_files_name_the_folders(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path, np.random.default_rng(0))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FastddError, match=str(tmp_path)) as err:
        load_dataset("mnist", data_root=tmp_path)
    assert "t10k-labels-idx1-ubyte" in str(err.value)
    monkeypatch.setattr(mnist_module, "SYSTEM_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FastddError, match="dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", data_root=tmp_path)
    assert str(tmp_path / "nowhere") in str(err.value)


def test_idx_labels_must_match_images(tmp_path):
    write_mnist_folder(tmp_path, np.random.default_rng(0))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), compress=False)
    with pytest.raises(FastddError, match="for 20 images"):
        load_dataset("mnist", data_root=tmp_path)


@pytest.mark.skipif(
    mnist_module.find_idx_files(mnist_module.SYSTEM_FASHION_MNIST) is None,
    reason="the Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist():
    data = load_dataset("fashion-mnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert torch.equal(data.class_index().counts, torch.full((10,), 6000))
    assert torch.equal(torch.bincount(data.test_labels), torch.full((10,), 1000))
    # The registered constants are the real training statistics (to the 4 digits they are given with).
    assert abs(float(data.train_images.double().mean())) < 1e-3
    assert abs(float(data.train_images.double().std()) - 1) < 1e-3


# ------------------------------------------------------------------------------------- torchvision-format datasets
def write_fake_cifar10(root: Path, rng: np.random.Generator):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = 4 + i
        # Same keys as the official files (Python 2 str keys read back as str with encoding="latin1").
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batches[name] = {"data": rows, "labels": [int(v) for v in rng.integers(0, 10, n)]}
        write_pickle(folder / name, batches[name])
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names})
    return batches, names


def test_cifar10_from_fake_batches_via_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    batches, names = write_fake_cifar10(tmp_path, np.random.default_rng(0))
    data = load_dataset("cifar10", data_root=str(tmp_path))
    assert data.class_names == names and data.num_classes == 10 and data.channels == 3
    assert data.dsa_strategy == "color_crop_cutout_flip_scale_rotate"
    # Rows are channel-major: 1024 red values, then green, then blue, each row-major 32x32.
    train_rows = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    expected = normalise(train_rows.reshape(-1, 3, 32, 32) / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.train_images.double(), expected, atol=1e-5, rtol=0)
    expected_labels = sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    assert data.train_labels.tolist() == [int(v) for v in expected_labels]
    expected = normalise(batches["test_batch"]["data"].reshape(-1, 3, 32, 32) / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.test_images.double(), expected, atol=1e-5, rtol=0)
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2023, 0.1994, 0.2010)


def test_cifar10_files_failing_checksum_raise(tmp_path):
    write_fake_cifar10(tmp_path, np.random.default_rng(0))
    with pytest.raises(FastddError, match="checksum") as err:
        load_dataset("cifar10", data_root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


def test_cifar100_from_fake_files_via_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", exists_only)
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    splits = {}
    for name, n in (("train", 12), ("test", 5)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        splits[name] = {"data": rows, "fine_labels": list(range(n)), "coarse_labels": [0] * n}
        write_pickle(folder / name, splits[name])
    names = [f"class{i:02d}" for i in range(100)]
    write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": ["c"] * 20})
    data = load_dataset("cifar100", data_root=tmp_path)
    assert data.num_classes == 100 and data.class_names == names
    assert data.train_labels.tolist() == list(range(12))
    expected = normalise(splits["test"]["data"].reshape(-1, 3, 32, 32) / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.test_images.double(), expected, atol=1e-5, rtol=0)


def test_svhn_from_fake_mat_via_torchvision(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_svhn, "check_integrity", exists_only)
    rng = np.random.default_rng(3)
    mats = {}
    for split, n in (("train", 11), ("test", 4)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # the .mat layout: H, W, C, N
        y = np.arange(1, n + 1).reshape(n, 1) % 10 + 1  # labels 1..10, 10 meaning the digit 0
        mats[split] = (x, y)
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    data = load_dataset("svhn", data_root=tmp_path)
    x, y = mats["train"]
    expected = normalise(x.transpose(3, 2, 0, 1) / 255.0, data.mean, data.std)
    torch.testing.assert_close(data.train_images.double(), expected, atol=1e-5, rtol=0)
    assert data.train_labels.tolist() == [int(v) % 10 for v in y.flatten()]
    assert "flip" not in data.dsa_strategy and data.class_names == [str(i) for i in range(10)]


@pytest.mark.parametrize(
    "name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "")]
)
def test_missing_torchvision_dataset_names_folder(tmp_path, name, folder):
    with pytest.raises(FastddError, match="never downloads") as err:
        load_dataset(name, data_root=tmp_path)
    assert str((tmp_path / folder).resolve()) in str(err.value)


# ----------------------------------------------------------------------------------------------------- imagefolder
def write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def striped(width: int, height: int, centre_colour) -> np.ndarray:
    """An H x W RGB image: a quarter of black on the left and right, ``centre_colour`` in the middle half."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, width // 4 : width - width // 4] = centre_colour
    return pixels


COLOURS = {"cat": (200, 10, 30), "dog": (5, 250, 100)}


def write_image_folder(root: Path, val_name: str = "val") -> None:
    for split, count in (("train", 3), (val_name, 2)):
        for name, colour in COLOURS.items():
            for i in range(count):
                # 16 wide x 8 high: the 8x8 center crop is exactly the coloured middle half.
                write_png(root / split / name / f"{i}.png", striped(16, 8, colour))
            # Tall images are resized (shorter side 16 -> 8) then cropped; a uniform image stays uniform.
            write_png(root / split / name / "tall.png", np.full((32, 16, 3), colour, dtype=np.uint8))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_imagefolder(tmp_path, val_name):
    write_image_folder(tmp_path, val_name)
    data = load_dataset("imagefolder", data_root=tmp_path, image_size=8)
    assert data.class_names == ["cat", "dog"] and data.num_classes == 2
    assert data.train_images.shape == (8, 3, 8, 8) and data.test_images.shape == (6, 3, 8, 8)
    assert data.train_labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and data.test_labels.tolist() == [0, 0, 0, 1, 1, 1]
    # Mean/std come from the training split: four uniform images of each colour.
    colours = np.array(list(COLOURS.values()), dtype=np.float64) / 255
    assert np.allclose(data.mean, colours.mean(0), atol=1e-6) and np.allclose(data.std, colours.std(0), atol=1e-6)
    unit = data.to_unit_range(data.train_images)
    expected = torch.tensor(colours, dtype=torch.float32)[data.train_labels].view(-1, 3, 1, 1).expand(-1, 3, 8, 8)
    torch.testing.assert_close(unit, expected, atol=1e-5, rtol=0)
    normalised = data.train_images.double()
    assert torch.allclose(normalised.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)


def test_imagefolder_keeps_the_images_own_size_by_default(tmp_path):
    write_image_folder(tmp_path)  # the first training image is 16 x 8: its shorter side is 8
    data = load_dataset("imagefolder", data_root=tmp_path)
    assert data.image_size == (8, 8)
    assert load_dataset("imagefolder", data_root=tmp_path, image_size=12).image_size == (12, 12)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FastddError, match="needs data_root"):
        load_dataset("imagefolder")
    write_image_folder(tmp_path)
    (tmp_path / "val" / "dog").rename(tmp_path / "val" / "horse")
    with pytest.raises(FastddError, match=r"only in train: \['dog'\]; only in val: \['horse'\]"):
        load_dataset("imagefolder", data_root=tmp_path, image_size=8)
    missing = tmp_path / "other"
    (missing / "train" / "cat").mkdir(parents=True)
    with pytest.raises(FastddError, match=str(missing / "val")):
        load_dataset("imagefolder", data_root=missing)


# ---------------------------------------------------------------------------------------------------------- names
def test_unknown_dataset_lists_known_names():
    with pytest.raises(FastddError, match="unknown dataset 'imagenet'; choose one of digits, fashion-mnist"):
        load_dataset("imagenet")


def test_names_are_case_and_underscore_insensitive(tmp_path):
    write_mnist_folder(tmp_path, np.random.default_rng(0))
    assert load_dataset("Fashion_MNIST", data_root=tmp_path).name == "fashion-mnist"
