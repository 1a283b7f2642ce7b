"""A run's tasks: one, or several sharing a trunk (train.tasks). Each task's prepared data (kiln.core.prepared), how
a multi-task model's logits are laid out (kiln.core.models.MultiTaskNet: every head's columns side by side), and the
tasks' training sets combined with labels offset into those columns."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.core.errors import InputError
from kiln.core.inference import Logits, accuracy
from kiln.core.params import Params
from kiln.core.prepared import load_split, read_manifest, task_folders, to_float


def logit_columns(classes: Mapping[str, int]) -> dict[str, slice]:
    """Each task's logit columns in a multi-task model, from the tasks' class counts in head order."""
    ends = np.cumsum(list(classes.values())).tolist()
    return {task: slice(end - count, end) for (task, count), end in zip(classes.items(), ends, strict=True)}


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a multi-task model, in the order of its heads: class counts, loss weights, augmentation."""

    names: tuple[str, ...]
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    augments: tuple[dict[str, Any], ...]  # each task's train.augmentation entry
    sampling: str = "proportional"  # batches: proportional to each task's training-set size | equal shares

    @property
    def offsets(self) -> list[int]:
        """The first logit column of each task."""
        return np.cumsum([0, *self.classes[:-1]]).tolist()

    def columns(self, index: int) -> slice:
        return logit_columns(dict(zip(self.names, self.classes, strict=True)))[self.names[index]]

    def task_of(self, labels: torch.Tensor) -> torch.Tensor:
        """The task index of each offset label."""
        return torch.bucketize(labels, torch.tensor(self.offsets[1:], device=labels.device), right=True)

    def sizes(self, labels: np.ndarray) -> list[int]:
        """How many of the offset `labels` belong to each task."""
        return np.bincount(self.task_of(torch.from_numpy(labels)).numpy(), minlength=len(self.names)).tolist()


@dataclass(frozen=True)
class TaskData:
    """A run's prepared arrays: the training set (every task's combined, labels offset, in a multi-task run) and each
    task's validation split with its own labels; `layout` is None for a single task."""

    layout: TaskLayout | None
    x_train: np.ndarray
    y_train: np.ndarray
    val: list[tuple[np.ndarray, np.ndarray]]
    manifests: dict[str, dict[str, Any]]

    def val_accuracy(self, run: Logits) -> float:
        """`run`'s validation accuracy: a multi-task model's is the mean over tasks of each head's on its task."""
        return float(np.mean([accuracy(run, to_float(x), y, self.layout.columns(index) if self.layout else slice(None))
                              for index, (x, y) in enumerate(self.val)]))

    def val_images(self) -> np.ndarray:
        """Every task's validation images, float32, one after another."""
        return to_float(np.concatenate([x for x, _ in self.val]))

    def arrays(self, keep: np.ndarray | None = None) -> dict[str, Any]:
        """What a training worker gets (kiln.train.distributed.train_worker, tune trials), training items `keep`
        (all by default)."""
        keep = slice(None) if keep is None else keep
        validation = {"val_by_task": self.val} if self.layout else {"x_val": self.val[0][0], "y_val": self.val[0][1]}
        return {"x_train": self.x_train[keep], "y_train": self.y_train[keep], "layout": self.layout, **validation}


def load_tasks(params: Params, data: Path) -> TaskData:
    """The prepared tasks in `data` (the primary first), checked against the ones params name; raises InputError
    when train.tasks changed since prepare ran."""
    folders = task_folders(data)
    if set(folders) != set(params.task_weights):
        raise InputError(f"train.tasks: {data} holds the tasks {list(folders)}, params name "
                         f"{list(params.task_weights)}; run `dvc repro prepare` to prepare them")
    manifests = {task: read_manifest(folder) for task, folder in folders.items()}
    train_sets = [load_split(folder, "train") for folder in folders.values()]
    val = [load_split(folder, "val") for folder in folders.values()]
    if len(folders) == 1:
        return TaskData(None, *train_sets[0], val, manifests)
    layout = TaskLayout(
        names=tuple(folders), classes=tuple(len(manifest["classes"]) for manifest in manifests.values()),
        weights=tuple(params.task_weights[task] for task in folders),
        augments=tuple(params.train.augmentation[task].model_dump() for task in folders),
        sampling=params.train.task_sampling)
    return TaskData(layout, *combined(train_sets, layout), val, manifests)


def combined(splits: Sequence[tuple[np.ndarray, np.ndarray]], layout: TaskLayout) -> tuple[np.ndarray, np.ndarray]:
    """Every task's (images, labels) as one set, labels offset into their task's columns."""
    images = np.concatenate([x for x, _ in splits])
    labels = np.concatenate([y + offset for (_, y), offset in zip(splits, layout.offsets, strict=True)])
    return images, labels
