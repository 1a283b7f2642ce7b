"""Stage `prepare`: read and validate the raw dataset, split it, write data/prepared (split .npz files + manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.config import Params, PrepareParams
from kiln.data import MANIFEST, save_split, split_file
from kiln.datasets import channel_stats, read_dataset, split_dataset
from kiln.io import atomic_path, sha256_file, write_json


def prepare(
    params: PrepareParams, out_dir: Path = Path("data/prepared"), cache_dir: Path = Path("data/raw")
) -> dict[str, Any]:
    """Write the train/val/test splits and manifest.json into `out_dir` atomically; returns the manifest."""
    raw = read_dataset(params.dataset, params.data_dir, cache_dir)
    test = f"{len(raw.test[1])} test" if raw.test else "no official test"
    print(f"prepare: read {len(raw.train[1])} train / {test} {params.dataset} images from {raw.source}")
    splits = split_dataset(raw, params.val_fraction, params.test_fraction, params.seed)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split, arrays in splits.items():
            save_split(split_file(tmp, split), *arrays)
        manifest = {
            "dataset": params.dataset,
            "classes": raw.classes,
            "image_shape": list(splits["train"][0].shape[1:]),
            "normalization": channel_stats(splits["train"][0]),
            "splits": {
                split: {"count": len(labels), "class_counts": np.bincount(labels, minlength=len(raw.classes)).tolist()}
                for split, (_, labels) in splits.items()
            },
            "files": {split_file(tmp, split).name: sha256_file(split_file(tmp, split)) for split in splits},
            "seed": params.seed,
        }
        write_json(tmp / MANIFEST, manifest)
    counts = " ".join(f"{split}={entry['count']}" for split, entry in manifest["splits"].items())
    print(f"prepare: wrote {out_dir} ({counts}, seed {params.seed})")
    return manifest


def run(params: Params) -> dict[str, Any]:
    """The stage as `python -m tasks prepare` runs it."""
    return prepare(params.prepare)

