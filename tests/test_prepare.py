"""The prepare stage and its dataset readers, on real files: scikit-learn's digits, tiny Fashion-MNIST IDX and
CIFAR-10 pickle sets written here, and Debian's Fashion-MNIST when it is installed."""

from __future__ import annotations

import gzip
import os
import pickle
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kiln.core.files import sha256_file
from kiln.core.params import PrepareParams, validate_params
from kiln.core.prepared import SPLITS, load_split, read_manifest, split_file
from kiln.platform.contract import stages
from kiln.prepare.datasets import DatasetError, channel_stats, read_cifar10, read_fashion_mnist, validate_arrays
from tasks import prepare as prepare_stage
from tests.conftest import TINY_PARAMS

REPO = Path(__file__).resolve().parents[1]
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
DEAD_PROXY = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}


def prepare(settings: PrepareParams, out: Path) -> dict:
    """The stage on the tiny params with this prepare section."""
    return prepare_stage.run(validate_params(TINY_PARAMS).model_copy(update={"prepare": settings}), out)


def digits_params(seed: int = 0) -> PrepareParams:
    return PrepareParams(dataset="digits", data_dir=Path("unused"), val_fraction=0.15, test_fraction=0.2, seed=seed)


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped IDX file: magic 0x0000 08 <ndim> (unsigned bytes), big-endian dimensions, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_tiny_fashion(folder: Path) -> dict[str, np.ndarray]:
    """Debian's flat layout: 50 train and 20 test 28x28 images, every class present."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    arrays = {}
    for part, count in (("train", 50), ("t10k", 20)):
        arrays[f"{part}-images"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"{part}-labels"] = np.arange(count, dtype=np.uint8) % 10
        write_idx(folder / f"{part}-images-idx3-ubyte.gz", arrays[f"{part}-images"])
        write_idx(folder / f"{part}-labels-idx1-ubyte.gz", arrays[f"{part}-labels"])
    return arrays


def test_digits_prepare_is_stratified_hashed_and_reproducible(tmp_path: Path) -> None:
    manifest = prepare(digits_params(), tmp_path / "a")
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == sorted(
        ["manifest.json", "train.npz", "val.npz", "test.npz"]
    )
    assert read_manifest(tmp_path / "a") == manifest
    assert set(manifest) == {"dataset", "classes", "image_shape", "normalization", "splits", "files", "seed", "tasks"}
    assert manifest["dataset"] == "digits" and manifest["classes"] == [str(digit) for digit in range(10)]
    assert manifest["image_shape"] == [1, 8, 8] and manifest["seed"] == 0
    assert sum(entry["count"] for entry in manifest["splits"].values()) == 1797
    for split in SPLITS:
        images, labels = load_split(tmp_path / "a", split)
        entry = manifest["splits"][split]
        assert images.dtype == np.uint8 and images.shape == (entry["count"], 1, 8, 8) and labels.dtype == np.int64
        assert entry["class_counts"] == np.bincount(labels, minlength=10).tolist() and min(entry["class_counts"]) > 0
        assert manifest["files"][f"{split}.npz"] == sha256_file(split_file(tmp_path / "a", split))
    assert manifest["splits"]["test"]["count"] == 360  # test_fraction 0.2 of all 1797, then val from the rest
    assert manifest["normalization"] == channel_stats(load_split(tmp_path / "a", "train")[0])

    again = prepare(digits_params(), tmp_path / "b")
    assert again == manifest
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()
    other = prepare(digits_params(seed=1), tmp_path / "c")
    assert all(other["files"][name] != manifest["files"][name] for name in manifest["files"])


@pytest.mark.fault
def test_failed_prepare_leaves_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DEAD_PROXY.items():
        monkeypatch.setenv(name, value)
    manifest = prepare(digits_params(), tmp_path / "out")
    missing = PrepareParams(
        dataset="fashion_mnist", data_dir=tmp_path / "nowhere", val_fraction=0.1, test_fraction=0.2, seed=0
    )
    with pytest.raises(DatasetError):
        prepare(missing, tmp_path / "out")
    assert read_manifest(tmp_path / "out") == manifest
    assert all(manifest["files"][name] == sha256_file(tmp_path / "out" / name) for name in manifest["files"])


def torchvision_layout(debian: Path, root: Path) -> Path:
    """The files of Debian's flat layout, uncompressed into torchvision's FashionMNIST/raw layout under `root`."""
    folder = root / "FashionMNIST/raw"
    folder.mkdir(parents=True)
    for gz in debian.glob("*.gz"):
        (folder / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


def test_fashion_mnist_reads_debian_and_torchvision_layouts(tmp_path: Path) -> None:
    arrays = write_tiny_fashion(tmp_path / "debian")
    raw = read_fashion_mnist(tmp_path / "debian")
    assert raw.classes[0] == "T-shirt/top" and len(raw.classes) == 10
    for (images, labels), part in ((raw.train, "train"), (raw.test, "t10k")):
        assert images.dtype == np.uint8 and images.shape == (len(arrays[f"{part}-images"]), 1, 28, 28)
        np.testing.assert_array_equal(images[:, 0], arrays[f"{part}-images"])
        assert labels.dtype == np.int64
        np.testing.assert_array_equal(labels, arrays[f"{part}-labels"])
    unpacked = read_fashion_mnist(torchvision_layout(tmp_path / "debian", tmp_path / "torchvision"))
    np.testing.assert_array_equal(unpacked.train[0], raw.train[0])

    params = PrepareParams(
        dataset="fashion_mnist", data_dir=tmp_path / "debian", val_fraction=0.2, test_fraction=0.3, seed=0
    )
    manifest = prepare(params, tmp_path / "prepared")
    counts = {split: entry["count"] for split, entry in manifest["splits"].items()}
    assert counts == {"train": 40, "val": 10, "test": 20}  # val from the official train part, test is t10k
    assert manifest["image_shape"] == [1, 28, 28]
    assert sorted(path.name for path in (tmp_path / "debian").iterdir()) == sorted(
        f"{name}.gz" for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                                  "t10k-labels-idx1-ubyte")), "reading writes nothing next to the raw files"


@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist absent"
)
def test_real_debian_fashion_mnist(tmp_path: Path) -> None:
    raw = read_fashion_mnist(DEBIAN_FASHION)
    assert raw.train[0].shape == (60000, 1, 28, 28) and raw.test[0].shape == (10000, 1, 28, 28)
    assert np.bincount(raw.train[1]).tolist() == [6000] * 10 and np.bincount(raw.test[1]).tolist() == [1000] * 10


@pytest.mark.bad_input
def test_missing_fashion_mnist_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DEAD_PROXY.items():  # a dead proxy: the download fails here even on a networked machine
        monkeypatch.setenv(name, value)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as error:
        read_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value) and "prepare.data_dir" in str(error.value)


@pytest.mark.bad_input
def test_corrupt_fashion_mnist_files_are_named(tmp_path: Path) -> None:
    write_tiny_fashion(tmp_path / "debian")
    unpacked = torchvision_layout(tmp_path / "debian", tmp_path / "torchvision")
    gz = tmp_path / "debian/train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated") as error:
        read_fashion_mnist(tmp_path / "debian")
    assert str(gz) in str(error.value)
    plain = unpacked / "FashionMNIST/raw/t10k-images-idx3-ubyte"  # torchvision's layout, uncompressed
    plain.write_bytes(plain.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        read_fashion_mnist(unpacked)


def test_cifar10_reads_torchvision_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))

    raw = read_cifar10(tmp_path)
    assert raw.classes == names
    assert raw.train[0].shape == (50, 3, 32, 32) and raw.test[0].shape == (10, 3, 32, 32)
    assert raw.train[0].dtype == np.uint8 and raw.train[1].dtype == np.int64
    np.testing.assert_array_equal(raw.train[0][10, 1], batches["data_batch_2"]["data"][0, 1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(raw.test[0].reshape(10, -1), batches["test_batch"]["data"])

    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3") as error:
        read_cifar10(tmp_path)
    assert str(folder) in str(error.value) and "cifar-10-python.tar.gz" in str(error.value)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("images", "labels", "problem"),
    [
        (np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 3]), "labels outside \\[0, 3\\)"),
        (np.zeros((3, 1, 2, 2), np.uint8), np.array([0, 1, 1]), "classes \\[2\\] have no images"),
        (np.zeros((3, 1, 2, 2), np.float32), np.array([0, 1, 2]), "dtype float32; expected uint8"),
        (np.full((3, 1, 2, 2), np.nan), np.array([0, 1, 2]), "NaN"),
        (np.zeros((3, 2, 2), np.uint8), np.array([0, 1, 2]), "expected 4 dimensions"),
        (np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 2]), "4 images but 3 labels"),
        (np.zeros((0, 1, 2, 2), np.uint8), np.array([], np.int64), "no images"),
    ],
)
def test_validate_arrays_names_the_problem(images: np.ndarray, labels: np.ndarray, problem: str) -> None:
    with pytest.raises(DatasetError, match=f"^val split: .*{problem}"):
        validate_arrays(images, labels, 3, "val split")


def cli(tmp_path: Path, prepare_section: dict) -> subprocess.CompletedProcess:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(prepare_section)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, **DEAD_PROXY, "PYTHONPATH": str(REPO)}
    command = [sys.executable, *shlex.split(stages(REPO)["prepare"].cmd)[1:], "--params", str(tmp_path / "params.yaml")]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"val_fraction": 0.7}, "prepare.val_fraction: Input should be less than 0.5"),
        ({"data_dir": "nowhere"}, "apt-get install dataset-fashion-mnist"),
    ],
)
def test_cli_input_errors_exit_1_without_traceback(tmp_path: Path, section: dict, message: str) -> None:
    result = cli(tmp_path, section)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data/prepared").exists()


def test_cli_writes_data_prepared(tmp_path: Path) -> None:
    result = cli(tmp_path, {"dataset": "digits", "seed": 3})
    assert result.returncode == 0, result.stderr
    assert "prepare: wrote data/prepared" in result.stdout
    assert read_manifest(tmp_path / "data/prepared")["seed"] == 3
