"""The training recipe: optimiser, learning-rate schedule, regularisation, augmentation, adversarial examples and
mixed precision, as params.yaml's train section describes them, plus seeding and in-memory data loaders."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.core.files import read_json
from kiln.core.params import TUNABLE_TRAIN_KEYS, AugmentParams, TrainParams
from kiln.core.prepared import to_float


@dataclass(frozen=True)
class Recipe:
    """How to train, apart from the model, the data and the number of epochs; every field is stated by whoever builds
    one (train: `make_recipe` from params.yaml's train section)."""

    optimizer: str                      # sgd (Nesterov momentum) | adamw
    lr: float                           # peak learning rate under a schedule
    momentum: float                     # SGD momentum (AdamW: beta1)
    weight_decay: float
    schedule: str                       # constant | onecycle | cosine (linear warm-up, then cosine to zero)
    warmup_epochs: float                # cosine only
    label_smoothing: float
    augment: AugmentParams
    adversarial: str                    # none | fgsm | pgd: adversarial examples replace part of each batch
    adversarial_epsilon: float
    adversarial_ratio: float            # fraction of each batch replaced
    pgd_steps: int
    amp: str                            # none | bf16 | fp16 (CUDA only)
    channels_last: bool                 # CUDA only


def make_recipe(train: TrainParams, dataset: str, tuned: dict[str, float] | None = None) -> Recipe:
    """The recipe `train` describes for `dataset`, with tuned values (lr, momentum, ...) taking precedence."""
    recipe = Recipe(
        optimizer=train.optimizer, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
        schedule=train.schedule, warmup_epochs=train.warmup_epochs, label_smoothing=train.label_smoothing,
        augment=train.augmentation[dataset], adversarial=train.adversarial.method,
        adversarial_epsilon=train.adversarial.epsilon, adversarial_ratio=train.adversarial.ratio,
        pgd_steps=train.adversarial.pgd_steps, amp=train.amp, channels_last=train.channels_last,
    )
    return with_values(recipe, tuned or {})


def tuned_hyperparameters(train: TrainParams, best_config: Path) -> dict[str, Any]:
    """The train section's tunable keys, replaced by the tune stage's best ones when `train.use_tuned` is set."""
    chosen = {key: getattr(train, key) for key in TUNABLE_TRAIN_KEYS}
    if train.use_tuned:
        if not best_config.is_file():
            raise FileNotFoundError(f"{best_config}: no tuned config; run the tune stage or set train.use_tuned")
        chosen.update(read_json(best_config)["hyperparameters"])
    return chosen


def with_values(recipe: Recipe, values: Mapping[str, Any]) -> Recipe:
    """`recipe` with the entries of `values` that name its fields (tuned or sampled lr, momentum, ...) in their place;
    other keys (batch_size, dropout, seed) are ignored."""
    return dataclasses.replace(recipe, **{key: value for key, value in values.items()
                                          if key in Recipe.__dataclass_fields__})


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
    if recipe.schedule == "onecycle":  # momentum (AdamW: beta1) dips by 0.1 as the rate peaks, PyTorch's default span
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=total,
                                                   max_momentum=recipe.momentum,
                                                   base_momentum=max(0.0, recipe.momentum - 0.1))
    if recipe.schedule == "cosine":
        warmup = round(recipe.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return None
