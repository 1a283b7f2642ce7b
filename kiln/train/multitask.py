"""Multi-task training through the one loop (kiln.core.multitask lays the tasks out): batches drawn from every task by a
rule, each item's loss weighted by its task, each task's own augmentation, validation per task."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from kiln.core.models import TaskHead
from kiln.core.multitask import TaskLayout
from kiln.core.params import AugmentParams
from kiln.train.augment import augment
from kiln.train.loop import Augment, Loss, Predict, validate


def weighted_loss(layout: TaskLayout, label_smoothing: float = 0.0) -> Loss:
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


def own_head_predictions(layout: TaskLayout) -> Predict:
    """The loop's predict hook: each item's argmax over its own task's columns (an offset label, like its target)."""
    column_task = torch.repeat_interleave(torch.arange(len(layout.classes)), torch.tensor(layout.classes))

    def predict(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        other = column_task.to(logits.device)[None, :] != layout.task_of(labels)[:, None]
        return logits.masked_fill(other, float("-inf")).argmax(1)

    return predict


def augment_by_task(layout: TaskLayout) -> Augment:
    """The loop's augment hook: each task's items augmented by that task's settings."""
    settings_by_task = [AugmentParams(**settings) for settings in layout.augments]

    def apply(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        task, images = layout.task_of(labels), images.clone()
        for index, settings in enumerate(settings_by_task):
            mine = task == index
            if mine.any():
                images[mine] = augment(images[mine], settings)
        return images

    return apply


def per_task_validation(layout: TaskLayout,
                        loaders: Sequence[DataLoader]) -> Callable[[nn.Module], dict[str, float]]:
    """The loop's validate hook: val_loss_<task> and val_accuracy_<task> on each task's validation split (labels of
    the task's own classes), and their means as val_loss and val_accuracy."""

    def run(model: nn.Module) -> dict[str, float]:
        metrics = {}
        for index, (name, loader) in enumerate(zip(layout.names, loaders, strict=True)):
            stats = validate(TaskHead(model, layout.columns(index)), loader)
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


def equal_shares(data: dict[str, Any], seed: int, rank: int = 0, world: int = 1) -> EqualShares | None:
    """The training sampler of a multi-task run drawing equal shares (kiln.core.multitask.TaskData.arrays' `data`);
    None otherwise (each item once per epoch, shuffled: the caller's default)."""
    layout = data.get("layout")
    if layout is None or layout.sampling != "equal":
        return None
    return EqualShares(layout.sizes(data["y_train"]), seed, rank, world)


def validation_sets(data: dict[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each task's validation (images, labels) in `data` (one task: its only split)."""
    return data["val_by_task"] if data.get("layout") else [(data["x_val"], data["y_val"])]
