"""Raw dataset readers, validation and the deterministic stratified split behind the prepare stage.

Every reader returns uint8 images shaped (N, C, H, W), int64 labels and the class names, for the
dataset's official train part and, where it has one, its official test part.
"""

from __future__ import annotations

import gzip
import pickle
import pkgutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.datasets import CIFAR10, FashionMNIST

from kiln.core.errors import InputError
from kiln.prepare.catalog import DATASETS

FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = tuple(name for name, _ in CIFAR10.train_list + CIFAR10.test_list) + (CIFAR10.meta["filename"],)

Arrays = tuple[np.ndarray, np.ndarray]


class DatasetError(InputError):
    """Raw data missing, unreadable or invalid; the message names the path or split and how to fix it."""


@dataclass(frozen=True)
class RawData:
    classes: list[str]
    train: Arrays
    test: Arrays | None  # None when the dataset has no official test split
    source: str  # where the data came from, for progress messages


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not): magic 0x0000 08 <ndim> for unsigned bytes, big-endian dimensions, then the data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as handle:
            content = handle.read()
        zero, dtype, ndim = struct.unpack(">HBB", content[:4])
        shape = struct.unpack(f">{ndim}I", content[4 : 4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError(f"magic {content[:4].hex()} is not an unsigned-byte IDX file")
        return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, zlib.error, struct.error, ValueError) as exc:
        raise DatasetError(f"{path}: corrupt or truncated IDX file ({exc}); reinstall dataset-fashion-mnist, "
                           "`dvc pull` the raw data, or replace the file") from None


def _fashion_files(data_dir: Path) -> list[Path] | None:
    """The four IDX files in `data_dir` (Debian's flat .gz layout, plain files, or torchvision's FashionMNIST/raw)."""
    for folder in (data_dir, data_dir / FashionMNIST.__name__ / "raw"):
        found = [next((p for p in (folder / f"{n}.gz", folder / n) if p.is_file()), None) for n in FASHION_FILES]
        if all(found):
            return found
    return None


def read_fashion_mnist(data_dir: Path) -> RawData:
    """Fashion-MNIST's IDX files from `data_dir` (t10k is the test part); without them, torchvision's download into
    `data_dir` is tried."""
    data_dir = Path(data_dir)
    files = _fashion_files(data_dir)
    if files is None:
        try:
            FashionMNIST(data_dir, download=True)
        except (OSError, RuntimeError) as exc:
            raise DatasetError(
                f"Fashion-MNIST not found in {data_dir} (looked for {', '.join(f'{n}.gz' for n in FASHION_FILES)}, "
                f"or torchvision's FashionMNIST/raw layout) and downloading it there failed: {exc}\n"
                "Install it with `apt-get install dataset-fashion-mnist` and run `make data` (or `dvc pull`), or set "
                "prepare.data_dir to a folder holding it."
            ) from None
        files = _fashion_files(data_dir)
    arrays = [_read_idx(path) for path in files]
    parts = []
    for images, labels, path in ((arrays[0], arrays[1], files[0]), (arrays[2], arrays[3], files[2])):
        if images.ndim != 3 or labels.ndim != 1:
            raise DatasetError(f"{path}: images shaped {images.shape}, labels {labels.shape}; expected (N, 28, 28) "
                               "and (N,)")
        parts.append((images[:, None].copy(), labels.astype(np.int64)))
    return RawData(list(FashionMNIST.classes), parts[0], parts[1], str(files[0].parent))


def read_digits(data_dir: Path | None = None) -> RawData:
    """scikit-learn's bundled 8x8 digits (pixel values 0..16 scaled to 0..255; `data_dir` is not read); no official
    test split."""
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[:, None]
    return RawData(
        [str(name) for name in digits.target_names],
        (images, digits.target.astype(np.int64)),
        None,
        "scikit-learn's bundled digits",
    )


class _CIFAR10Pickles(CIFAR10):
    """torchvision's CIFAR-10 pickle reader, checking that the files exist but not their md5 sums."""

    train_list = [(name, None) for name, _ in CIFAR10.train_list]
    test_list = [(name, None) for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def read_cifar10(data_dir: Path) -> RawData:
    """CIFAR-10 from `<data_dir>/cifar-10-batches-py` (torchvision's python pickle batches); never downloads."""
    folder = Path(data_dir) / CIFAR10.base_folder
    missing = [name for name in CIFAR_FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}. Download cifar-10-python.tar.gz from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {data_dir} (or set prepare.data_dir)."
        )
    try:
        train, test = (_CIFAR10Pickles(data_dir, train=flag) for flag in (True, False))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, OSError) as exc:
        raise DatasetError(f"{folder}: unreadable CIFAR-10 batch ({exc!r})") from None
    parts = [(part.data.transpose(0, 3, 1, 2), np.asarray(part.targets, dtype=np.int64)) for part in (train, test)]
    return RawData(list(train.classes), parts[0], parts[1], str(folder))


def validate_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
    """Raise DatasetError unless `images` is non-empty uint8 NCHW with one label in [0, num_classes) per image
    and every class present."""
    if images.size == 0 or labels.size == 0:
        raise DatasetError(f"{name}: no images (images {images.shape}, labels {labels.shape})")
    if images.ndim != 4:
        raise DatasetError(f"{name}: images have shape {images.shape}; expected 4 dimensions (N, C, H, W)")
    if np.issubdtype(images.dtype, np.floating) and np.isnan(images).any():
        raise DatasetError(f"{name}: images contain NaN pixels")
    if images.dtype != np.uint8:
        raise DatasetError(f"{name}: images have dtype {images.dtype}; expected uint8")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{name}: labels have shape {labels.shape} and dtype {labels.dtype}; expected 1-D integers")
    if len(images) != len(labels):
        raise DatasetError(f"{name}: {len(images)} images but {len(labels)} labels")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DatasetError(f"{name}: {bad.size} labels outside [0, {num_classes}), e.g. {bad[0]}")
    empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    if empty.size:
        raise DatasetError(f"{name}: classes {empty.tolist()} have no images")


def read_dataset(name: str, data_dir: Path) -> RawData:
    """Read and validate the dataset `name` with its catalog entry's reader (kiln.prepare.catalog)."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    raw = pkgutil.resolve_name(DATASETS[name].reader)(data_dir)
    for part, arrays in (("train", raw.train), ("test", raw.test)):
        if arrays is not None:
            validate_arrays(*arrays, len(raw.classes), f"{name} official {part} part")
    return raw


def split_dataset(raw: RawData, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Arrays]:
    """Stratified train/val/test split by `seed`: val from the official train part; test is the official test part,
    or `test_fraction` of all images when there is none."""
    images, labels = raw.train
    try:
        if raw.test is None:
            images, test_images, labels, test_labels = train_test_split(
                images, labels, test_size=test_fraction, stratify=labels, random_state=seed
            )
        else:
            test_images, test_labels = raw.test
        train_images, val_images, train_labels, val_labels = train_test_split(
            images, labels, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as exc:
        raise DatasetError(f"cannot split {len(raw.train[1])} images into stratified train/val/test: {exc}") from None
    splits = {
        "train": (train_images, train_labels),
        "val": (val_images, val_labels),
        "test": (test_images, test_labels),
    }
    for split, arrays in splits.items():
        validate_arrays(*arrays, len(raw.classes), f"{split} split")
    return splits


def resized(raw: RawData, side: int) -> RawData:
    """`raw` with every image resized to `side` x `side` (antialiased bilinear, back to uint8)."""

    def resize(images: np.ndarray) -> np.ndarray:
        scaled = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=(side, side),
                                                 mode="bilinear", antialias=True, align_corners=False)
        return scaled.round().clamp(0, 255).to(torch.uint8).numpy()

    parts = [None if part is None else (resize(part[0]), part[1]) for part in (raw.train, raw.test)]
    return RawData(raw.classes, parts[0], parts[1], f"{raw.source}, resized to {side}x{side}")


def channel_stats(images: np.ndarray) -> dict[str, list[float]]:
    """Per-channel mean and std of uint8 NCHW pixels scaled to [0, 1]."""
    return {
        "mean": (images.mean(axis=(0, 2, 3), dtype=np.float64) / 255).tolist(),
        "std": (images.std(axis=(0, 2, 3), dtype=np.float64) / 255).tolist(),
    }
