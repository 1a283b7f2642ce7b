"""The prepared-data format every stage reads: one `.npz` per split plus `manifest.json`.

Images are uint8 arrays shaped (N, C, H, W); labels are int64 class indices. Models take
float32 pixels in [0, 1] (see `to_float`) and normalise inside themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import reading
from kiln.core.files import read_json

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REMAKE = "run `dvc repro prepare` (or `dvc checkout data/prepared`) to write it again"


def split_file(prepared_dir: Path | str, split: str) -> Path:
    return Path(prepared_dir) / f"{split}.npz"


def save_split(path: Path | str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write one split (no compression: loading speed beats the few MB saved)."""
    with open(path, "wb") as handle:
        np.savez(handle, x=images.astype(np.uint8), y=labels.astype(np.int64))


def load_split(prepared_dir: Path | str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load `split` as (uint8 images NCHW, int64 labels)."""
    path = split_file(prepared_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared split missing; run the prepare stage (dvc repro prepare)")
    with reading(path, REMAKE), np.load(path) as arrays:
        return arrays["x"], arrays["y"]


def read_manifest(prepared_dir: Path | str) -> dict[str, Any]:
    """Counts, classes, image shape, normalisation statistics and file hashes of the prepared data."""
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest missing; run the prepare stage (dvc repro prepare)")
    with reading(path, REMAKE):
        return read_json(path)


def task_folder(prepared_dir: Path | str, task: str, primary: str) -> Path:
    """Where task `task`'s splits and manifest live: the primary task at the top, the others under tasks/<name>."""
    return Path(prepared_dir) if task == primary else Path(prepared_dir) / "tasks" / task


def task_folders(prepared_dir: Path | str) -> dict[str, Path]:
    """Every task's folder, the primary task first (single-task data: just the primary, the folder itself)."""
    manifest = read_manifest(prepared_dir)
    return {task: task_folder(prepared_dir, task, manifest["dataset"])
            for task in manifest.get("tasks", [manifest["dataset"]])}


def shared_normalization(manifests: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-channel mean and std over the training images of every manifest's data together (equal-sized images)."""
    counts = np.array([manifest["splits"]["train"]["count"] for manifest in manifests], dtype=np.float64)
    means = np.array([manifest["normalization"]["mean"] for manifest in manifests])
    squares = np.array([manifest["normalization"]["std"] for manifest in manifests]) ** 2 + means ** 2
    mean = counts @ means / counts.sum()
    return {"mean": mean.tolist(), "std": np.sqrt(counts @ squares / counts.sum() - mean ** 2).tolist()}


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1], the input every kiln model expects."""
    return images.astype(np.float32) / 255.0


def stratified_head(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset of `count` items (all of them if fewer)."""
    if count >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = np.concatenate([idx[: max(1, round(count * len(idx) / len(labels)))] for idx in per_class])
    return np.sort(rng.permutation(take)[:count])


def per_class(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` random items of every class (a few-shot draw, seeded), in sorted order."""
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]))
