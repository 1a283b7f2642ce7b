"""The training loop shared by tune trials, Ray Train workers and compression fine-tunes (plain PyTorch): the recipe
(optimiser, schedule, regularisation, augmentation, adversarial examples, mixed precision) and one epoch of it."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.adversarial import fgsm, pgd
from kiln.augment import AugmentSettings, augment
from kiln.config import TrainParams
from kiln.data import to_float

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Recipe:
    """How to train, apart from the model, the data and the number of epochs."""

    optimizer: str = "sgd"              # sgd (Nesterov momentum) | adamw
    lr: float = 0.05                    # peak learning rate under a schedule
    momentum: float = 0.9               # SGD momentum (AdamW: beta1)
    weight_decay: float = 1e-4
    schedule: str = "constant"          # constant | onecycle | cosine (linear warm-up, then cosine to zero)
    warmup_epochs: float = 0.0          # cosine only
    label_smoothing: float = 0.0
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    adversarial: str = "none"           # none | fgsm | pgd: adversarial examples replace part of each batch
    adversarial_epsilon: float = 0.0
    adversarial_ratio: float = 0.0      # fraction of each batch replaced
    pgd_steps: int = 3
    amp: str = "none"                   # none | bf16 | fp16 (CUDA only)
    channels_last: bool = False         # CUDA only


def make_recipe(train: TrainParams, dataset: str, tuned: dict[str, float] | None = None) -> Recipe:
    """The recipe `train` describes for `dataset`, with tuned values (lr, momentum, ...) taking precedence."""
    recipe = Recipe(
        optimizer=train.optimizer, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
        schedule=train.schedule, warmup_epochs=train.warmup_epochs, label_smoothing=train.label_smoothing,
        augment=AugmentSettings(**train.augmentation[dataset].model_dump()), adversarial=train.adversarial.method,
        adversarial_epsilon=train.adversarial.epsilon, adversarial_ratio=train.adversarial.ratio,
        pgd_steps=train.adversarial.pgd_steps, amp=train.amp, channels_last=train.channels_last,
    )
    return with_values(recipe, tuned or {})


def with_values(recipe: Recipe, values: Mapping[str, Any]) -> Recipe:
    """`recipe` with the entries of `values` that name its fields (tuned or sampled lr, momentum, ...) in their place;
    other keys (batch_size, dropout, seed) are ignored."""
    return dataclasses.replace(recipe, **{key: value for key, value in values.items()
                                          if key in Recipe.__dataclass_fields__})


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """In-memory uint8 images, converted once to float32 in [0, 1], with their labels."""
    return TensorDataset(torch.from_numpy(to_float(images)), torch.tensor(labels))


def make_loader(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader over `to_dataset(images, labels)`, shuffled by `seed` when `shuffle`."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(to_dataset(images, labels), batch_size=batch_size, shuffle=shuffle, generator=generator)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, or AdamW; weight decay skips biases and norm layers (1-d parameters)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, recipe: Recipe) -> None:
    """Set the recipe's lr, momentum and weight decay on a live optimiser (PBT perturbs them between epochs)."""
    for group in optimizer.param_groups:
        group["lr"] = recipe.lr
        if "betas" in group:
            group["betas"] = (recipe.momentum, group["betas"][1])
        else:
            group["momentum"] = recipe.momentum
        if group["weight_decay"] > 0:
            group["weight_decay"] = recipe.weight_decay


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, epochs: int,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-batch learning-rate schedule, or None for a constant rate."""
    total = epochs * steps_per_epoch
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total)
    if recipe.schedule == "cosine":
        warmup = round(recipe.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None


def _all_reduce(loss_sum: float, correct: int, count: int) -> EpochStats:
    """Sum the counters over DDP workers (no-op in a single process)."""
    totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return EpochStats(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1), images=int(count))


def with_adversarial(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """The batch with its first `adversarial_ratio` share replaced by FGSM or PGD examples crafted against the
    current model (in eval mode, so the attack's forward passes leave batch-norm statistics alone)."""
    count = round(len(images) * recipe.adversarial_ratio)
    if recipe.adversarial == "none" or count == 0:
        return images
    model.eval()
    head, tail = images[:count], labels[:count]
    attack = fgsm(model, head, tail, recipe.adversarial_epsilon) if recipe.adversarial == "fgsm" else pgd(
        model, head, tail, recipe.adversarial_epsilon, recipe.pgd_steps)
    model.train()
    return torch.cat([attack, images[count:]])


def train_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, recipe: Recipe | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, loss_fn: Loss | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> EpochStats:
    """One pass over `loader` following `recipe` (plain cross-entropy steps when None), or minimising `loss_fn`;
    returns loss and accuracy summed over all workers."""
    recipe = recipe or Recipe()
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        if recipe.augment.active:
            images = augment(images, recipe.augment)
        images = with_adversarial(model, images, labels, recipe)
        if recipe.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        autocast = (torch.autocast(images.device.type, dtype=AMP_DTYPES[recipe.amp]) if recipe.amp in AMP_DTYPES
                    else contextlib.nullcontext())
        with autocast:
            logits = model(images)
            loss = (nn.functional.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)
                    if loss_fn is None else loss_fn(logits, images, labels))
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return _all_reduce(loss_sum, correct, count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> EpochStats:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images).float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return _all_reduce(loss_sum, correct, count)


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by `min_delta` for `patience` epochs (patience 0: never)."""

    metric: str = "val_accuracy"
    mode: str = "max"
    patience: int = 0
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    stale: int = 0

    def update(self, metrics: dict[str, float]) -> bool:
        """Record an epoch's metrics; True when training should stop."""
        value, sign = metrics[self.metric], 1 if self.mode == "max" else -1
        if self.best is None or sign * (value - self.best) > self.min_delta:
            self.best, self.best_epoch, self.stale = value, int(metrics["epoch"]), 0
            return False
        self.stale += 1
        return 0 < self.patience <= self.stale
