"""Prepared data on disk: each task's dataset read, resized if asked, split, and written with its manifest, all at
once. The primary task (prepare.dataset) sits at the top of the folder, where single-task stages read it; every other
task of a multi-task run in `tasks/<name>/`, the same format (kiln.core.prepared.task_folders finds them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.core.files import atomic_path, write_json
from kiln.core.params import PrepareParams
from kiln.core.prepared import MANIFEST, save_split, split_file, task_folder
from kiln.prepare.datasets import read_dataset, resized, split_dataset
from kiln.prepare.manifest import build_manifest


def write_task(settings: PrepareParams, folder: Path, stage: str) -> dict[str, Any]:
    """Write the train/val/test splits and the manifest of the dataset `settings` describe into `folder` (created);
    returns the manifest."""
    raw = read_dataset(settings.dataset, settings.data_dir)
    if settings.image_side is not None:
        raw = resized(raw, settings.image_side)
    test = f"{len(raw.test[1])} test" if raw.test else "no official test"
    print(f"{stage}: read {len(raw.train[1])} train / {test} {settings.dataset} images from {raw.source}")
    splits = split_dataset(raw, settings.val_fraction, settings.test_fraction, settings.seed)
    folder.mkdir(parents=True)
    for split, arrays in splits.items():
        save_split(split_file(folder, split), *arrays)
    manifest = build_manifest(settings.dataset, raw.classes, splits, folder, settings.seed)
    write_json(folder / MANIFEST, manifest)
    return manifest


def write_prepared(settings: PrepareParams, out: Path, stage: str,
                   tasks: Sequence[str] = ()) -> dict[str, Any]:
    """Write every task's splits and manifest into `out` (`tasks`: the datasets of a multi-task run, the primary
    first; empty: prepare.dataset alone); returns the primary task's manifest, which lists the tasks. `stage`
    prefixes the progress lines."""
    tasks = list(tasks) or [settings.dataset]
    with atomic_path(out) as tmp:
        manifests = {task: write_task(settings.model_copy(update={"dataset": task}), task_folder(tmp, task, tasks[0]),
                                      stage) for task in tasks}
        manifest = {**manifests[tasks[0]], "tasks": tasks}
        write_json(tmp / MANIFEST, manifest)
    for task, written in manifests.items():
        counts = " ".join(f"{split}={entry['count']}" for split, entry in written["splits"].items())
        print(f"{stage}: wrote {task_folder(out, task, tasks[0])} ({counts}, seed {settings.seed})")
    return manifest
