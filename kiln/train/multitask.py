"""Multi-task training through the one loop: the tasks' training sets concatenated, each label offset into its task's
columns of the model's logits (kiln.core.models.MultiTaskNet); batches drawn from every task by a rule; the task
losses summed by weight; each task's own augmentation; validation per task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kiln.core.errors import InputError
from kiln.core.params import Params
from kiln.core.prepared import load_split, read_manifest, task_folders
from kiln.train.augment import AugmentSettings, augment
from kiln.train.loop import validate
from kiln.train.recipe import dataset_augmentation


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a multi-task model, in the order of its heads: class counts, loss weights, augmentation."""

    names: tuple[str, ...]
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    augments: tuple[AugmentSettings, ...]
    sampling: str = "proportional"  # batches: proportional to each task's training-set size | equal shares

    @property
    def offsets(self) -> list[int]:
        """The first logit column of each task."""
        return np.cumsum([0, *self.classes[:-1]]).tolist()

    def columns(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index] + self.classes[index])

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
        augments=tuple(dataset_augmentation(params.train, task) for task in folders),
        sampling=params.train.task_sampling)
    return TaskData(layout, *combined(train_sets, layout), val, manifests)


def combined(splits: Sequence[tuple[np.ndarray, np.ndarray]], layout: TaskLayout) -> tuple[np.ndarray, np.ndarray]:
    """Every task's (images, labels) as one set, labels offset into their task's columns."""
    images = np.concatenate([x for x, _ in splits])
    labels = np.concatenate([y + offset for (_, y), offset in zip(splits, layout.offsets, strict=True)])
    return images, labels


def weighted_loss(layout: TaskLayout, label_smoothing: float = 0.0) -> Any:
    """The loop's loss hook: each item's cross-entropy on its own task's head, times its task's weight, averaged
    over the batch. A task counts by its share of the batches (the sampling rule) and its weight; a per-task mean
    instead would give the one item of a rare task a whole batch's pull, which wrecked proportional runs."""
    weights = torch.tensor(layout.weights)

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        task, per_item = layout.task_of(labels), logits.new_zeros(len(labels))
        for index in range(len(layout.names)):
            mine, columns = task == index, layout.columns(index)
            if mine.any():
                per_item[mine] = nn.functional.cross_entropy(logits[mine, columns], labels[mine] - columns.start,
                                                             reduction="none", label_smoothing=label_smoothing)
        return (weights.to(logits.device)[task] * per_item).mean()

    return loss


def own_head_predictions(layout: TaskLayout) -> Any:
    """The loop's predict hook: each item's argmax over its own task's columns (an offset label, like its target)."""
    column_task = torch.repeat_interleave(torch.arange(len(layout.classes)), torch.tensor(layout.classes))

    def predict(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        other = column_task.to(logits.device)[None, :] != layout.task_of(labels)[:, None]
        return logits.masked_fill(other, float("-inf")).argmax(1)

    return predict


def augment_by_task(layout: TaskLayout) -> Any:
    """The loop's augment hook: each task's items augmented by that task's settings."""

    def apply(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        task, images = layout.task_of(labels), images.clone()
        for index, settings in enumerate(layout.augments):
            mine = task == index
            if settings.active and mine.any():
                images[mine] = augment(images[mine], settings)
        return images

    return apply


class Head(nn.Module):
    """One task's logits of a multi-task model."""

    def __init__(self, model: nn.Module, columns: slice) -> None:
        super().__init__()
        self.model, self.columns = model, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.columns]


def per_task_validation(layout: TaskLayout, loaders: Sequence[DataLoader]) -> Any:
    """The loop's validate hook: val_loss_<task> and val_accuracy_<task> on each task's validation split (labels of
    the task's own classes), and their means as val_loss and val_accuracy."""

    def run(model: nn.Module) -> dict[str, float]:
        metrics = {}
        for index, (name, loader) in enumerate(zip(layout.names, loaders, strict=True)):
            stats = validate(Head(model, layout.columns(index)), loader)
            metrics.update({f"val_loss_{name}": stats.loss, f"val_accuracy_{name}": stats.accuracy})
        return {"val_loss": float(np.mean([metrics[f"val_loss_{name}"] for name in layout.names])),
                "val_accuracy": float(np.mean([metrics[f"val_accuracy_{name}"] for name in layout.names])), **metrics}

    return run


def multitask_hooks(layout: TaskLayout, val_loaders: Sequence[DataLoader], label_smoothing: float) -> dict[str, Any]:
    """The loss, predict, augment and validate hooks of a multi-task run (spread into kiln.train.loop.Hooks)."""
    return dict(loss=weighted_loss(layout, label_smoothing), predict=own_head_predictions(layout),
                augment=augment_by_task(layout), validate=per_task_validation(layout, val_loaders))


class EqualShares(Sampler[int]):
    """Indices into the combined training set giving every task the same share of each epoch (the mean task size
    each: a smaller task repeats, reshuffled; a larger one gives a fresh subset), shuffled together by (seed, epoch),
    then this rank's shard."""

    def __init__(self, task_sizes: Sequence[int], seed: int, rank: int = 0, world: int = 1) -> None:
        self.sizes, self.seed, self.rank, self.world, self.epoch = list(task_sizes), seed, rank, world, 0
        self.share = sum(self.sizes) // len(self.sizes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.share * len(self.sizes) // self.world

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        picks, start = [], 0
        for size in self.sizes:
            copies = -(-self.share // size)
            picks.append(torch.cat([torch.randperm(size, generator=generator) for _ in range(copies)])[:self.share]
                         + start)
            start += size
        items = torch.cat(picks)
        items = items[torch.randperm(len(items), generator=generator)]
        return iter(items[self.rank::self.world][:len(self)].tolist())
