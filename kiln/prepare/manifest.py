"""The prepared data's manifest: what a later stage (or a person) needs to know without loading the arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.files import sha256_file
from kiln.core.prepared import split_file
from kiln.prepare.datasets import Arrays, channel_stats


def build_manifest(dataset: str, classes: list[str], splits: dict[str, Arrays], folder: Path,
                   seed: int) -> dict[str, Any]:
    """Counts and class histogram per split, image shape, normalisation statistics of the training split, and the
    sha256 of each split file already written to `folder`."""
    return {
        "dataset": dataset,
        "classes": classes,
        "image_shape": list(splits["train"][0].shape[1:]),
        "normalization": channel_stats(splits["train"][0]),
        "splits": {split: {"count": len(labels), "class_counts": np.bincount(labels, minlength=len(classes)).tolist()}
                   for split, (_, labels) in splits.items()},
        "files": {split_file(folder, split).name: sha256_file(split_file(folder, split)) for split in splits},
        "seed": seed,
    }
