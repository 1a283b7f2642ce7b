"""The one training loop: every model kiln trains (Ray Train workers, tune trials, compression fine-tunes and
distillation) goes through `run_epochs`, extended by `Hooks` rather than forked.

`run_epochs` trains from the epoch after `progress` (a resumed run continues its history), validates, tracks early
stopping and the best epoch's weights, and calls `on_epoch` (report, checkpoint) after each epoch. With a `seed`, the
RNG and the shuffle are re-seeded from (seed, epoch, rank) at every epoch, so a resumed or repeated run gives the
same numbers.
Iterative schemes (prune, then fine-tune, in rounds) call it once per round with the rebuilt model, passing the same
`progress` so the history continues.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from kiln.core.adversarial import fgsm, pgd
from kiln.train.augment import augment
from kiln.train.recipe import Recipe, seed_everything

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> predicted labels
Augment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, labels) -> augmented images
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
VAL_BATCH = 512  # validation batches: large for speed; the metrics do not depend on it


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int


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
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, recipe: Recipe,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, loss_fn: Loss | None = None,
    scaler: torch.amp.GradScaler | None = None, on_step: Callable[[], None] | None = None,
    hooks: Hooks | None = None,
) -> EpochStats:
    """One pass over `loader` following `recipe`, or minimising `loss_fn`; `on_step` runs after every optimiser step;
    `hooks` may augment the batch and predict from the logits instead. Returns loss and accuracy summed over all
    workers."""
    hooks = hooks or Hooks()
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        images = hooks.augment(images, labels) if hooks.augment is not None else augment(images, recipe.augment)
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
        if on_step is not None:
            on_step()
        loss_sum += loss.item() * len(labels)
        predicted = logits.argmax(1) if hooks.predict is None else hooks.predict(logits.detach(), labels)
        correct += (predicted == labels).sum().item()
        count += len(labels)
    return _all_reduce(loss_sum, correct, count)


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader) -> EpochStats:
    """Mean cross-entropy and accuracy of `model` over `loader`, summed over all workers."""
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


@dataclass
class Progress:
    """What a run has done so far: one metrics row per epoch, early stopping's state, the best epoch's weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    stopper: EarlyStopping = field(default_factory=EarlyStopping)
    best_model: dict[str, torch.Tensor] | None = None

    @property
    def epoch(self) -> int:
        return len(self.history)


@dataclass(frozen=True)
class Hooks:
    """Extension points of `run_epochs`."""

    loss: Loss | None = None  # replaces the recipe's cross-entropy, e.g. distillation against a teacher
    on_step: Callable[[], None] | None = None  # after every optimiser step, e.g. AdaLoRA's update_and_allocate
    on_epoch: Callable[[dict[str, float], Progress], None] | None = None  # after every epoch: print, report, save
    augment: Augment | None = None  # replaces the recipe's augmentation, e.g. each task's own (kiln.train.multitask)
    predict: Predict | None = None  # training accuracy's predictions instead of the logits' argmax
    validate: Callable[[nn.Module], dict[str, float]] | None = None  # replaces val_loader's val_loss/val_accuracy


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def run_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, train_loader: DataLoader, epochs: int, recipe: Recipe, *,
    val_loader: DataLoader | None = None, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None, progress: Progress | None = None, seed: int | None = None,
    rank: int = 0, hooks: Hooks = Hooks(),
) -> Progress:
    """Train from epoch `progress.epoch + 1` to `epochs` (fewer when early stopping says so); returns the progress.

    Each epoch's row: epoch, train_loss, train_accuracy, val_loss and val_accuracy (with a `val_loader`, or what
    `hooks.validate` returns), images_per_second, lr. A non-finite training loss raises FloatingPointError naming
    the epoch.
    """
    progress = progress or Progress()
    for epoch in range(progress.epoch + 1, epochs + 1):
        if seed is not None:
            seed_everything(seed + 1000 * epoch + rank)
        if hasattr(train_loader.sampler, "set_epoch"):  # DDP shards: the shuffle is a function of (seed, epoch)
            train_loader.sampler.set_epoch(epoch)
        elif seed is not None and train_loader.generator is not None:  # the same for a single process's loader
            train_loader.generator.manual_seed(seed + 1000 * epoch + rank)
        started = time.perf_counter()
        fit = train_epoch(model, train_loader, optimizer, recipe, scheduler, hooks.loss, scaler, hooks.on_step, hooks)
        seconds = time.perf_counter() - started
        if not math.isfinite(fit.loss):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss {fit.loss})")
        metrics = {"epoch": epoch, "train_loss": fit.loss, "train_accuracy": fit.accuracy}
        if hooks.validate is not None:
            metrics.update(hooks.validate(model))
        elif val_loader is not None:
            val = validate(model, val_loader)
            metrics.update(val_loss=val.loss, val_accuracy=val.accuracy)
        metrics.update(images_per_second=fit.images / seconds, lr=optimizer.param_groups[0]["lr"])
        progress.history.append(metrics)
        stop = "val_loss" in metrics and progress.stopper.update(metrics)
        if progress.stopper.best_epoch == epoch:
            weights = unwrap(model).state_dict()
            progress.best_model = {name: value.detach().cpu().clone() for name, value in weights.items()}
        if hooks.on_epoch is not None:
            hooks.on_epoch(metrics, progress)
        if stop:
            break
    return progress
