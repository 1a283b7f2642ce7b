"""The training loop pieces shared by tune trials and Ray Train workers (plain PyTorch)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kiln.data import to_float

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, images, labels) -> loss


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


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)


def _all_reduce(loss_sum: float, correct: int, count: int) -> EpochStats:
    """Sum the counters over DDP workers (no-op in a single process)."""
    totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    return EpochStats(loss=loss_sum / max(count, 1), accuracy=correct / max(count, 1), images=int(count))


def train_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, loss_fn: Loss | None = None
) -> EpochStats:
    """One pass over `loader` minimising `loss_fn` (cross-entropy by default); returns loss and accuracy summed over
    all workers."""
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = nn.functional.cross_entropy(logits, labels) if loss_fn is None else loss_fn(logits, images, labels)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return _all_reduce(loss_sum, correct, count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> EpochStats:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for images, labels in loader:
        logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += len(labels)
    return _all_reduce(loss_sum, correct, count)
