"""The datasets kiln prepares, one entry each, next to their readers (kiln.prepare.datasets). Torch-free: params
validation reads it before anything heavy is imported. A new dataset is a reader (`data_dir -> RawData`) and an
entry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    channels: int
    side: int  # the native image side, in pixels
    mirror_safe: bool  # a horizontally mirrored image keeps its label (train.augmentation.<name>.hflip)
    reader: str  # "module:function" taking the raw data folder (prepare.data_dir), returning RawData


DATASETS: dict[str, Dataset] = {
    "fashion_mnist": Dataset(channels=1, side=28, mirror_safe=True, reader="kiln.prepare.datasets:read_fashion_mnist"),
    "digits": Dataset(channels=1, side=8, mirror_safe=False, reader="kiln.prepare.datasets:read_digits"),
    "cifar10": Dataset(channels=3, side=32, mirror_safe=True, reader="kiln.prepare.datasets:read_cifar10"),
}
