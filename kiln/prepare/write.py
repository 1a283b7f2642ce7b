"""Prepared data on disk: a dataset read, resized if asked, split, and written with its manifest, all at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core.files import atomic_path, write_json
from kiln.core.params import PrepareParams
from kiln.core.prepared import MANIFEST, save_split, split_file
from kiln.prepare.datasets import read_dataset, resized, split_dataset
from kiln.prepare.manifest import build_manifest


def write_prepared(settings: PrepareParams, out: Path, stage: str) -> dict[str, Any]:
    """Write the train/val/test splits and the manifest of the dataset `settings` describe into `out`; returns the
    manifest. `stage` prefixes the progress lines."""
    raw = read_dataset(settings.dataset, settings.data_dir)
    if settings.image_side is not None:
        raw = resized(raw, settings.image_side)
    test = f"{len(raw.test[1])} test" if raw.test else "no official test"
    print(f"{stage}: read {len(raw.train[1])} train / {test} {settings.dataset} images from {raw.source}")
    splits = split_dataset(raw, settings.val_fraction, settings.test_fraction, settings.seed)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split, arrays in splits.items():
            save_split(split_file(tmp, split), *arrays)
        manifest = build_manifest(settings.dataset, raw.classes, splits, tmp, settings.seed)
        write_json(tmp / MANIFEST, manifest)
    counts = " ".join(f"{split}={entry['count']}" for split, entry in manifest["splits"].items())
    print(f"{stage}: wrote {out} ({counts}, seed {settings.seed})")
    return manifest
