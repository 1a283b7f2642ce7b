"""Knowledge distillation: a thinner student of the same plain CNN family, trained on the teacher's softened logits
through the one training loop (its loss hook)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.compress.pruning import fine_tune, plain_cnn


def distill(
    teacher: nn.Module, width: float, loader: DataLoader, epochs: int, lr: float, temperature: float, alpha: float
) -> nn.Module:
    """A student with `width` times the teacher's layer widths (same plain CNN family), trained from scratch on
    alpha * T^2 * KL(teacher || student, both softened by temperature T) + (1 - alpha) * cross-entropy."""
    net = plain_cnn(teacher)
    student = nn.Sequential(copy.deepcopy(teacher[0]),
                            net.with_widths([max(1, round(size * width)) for size in net.widths]))
    teacher.eval()

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = nn.functional.log_softmax(teacher(images) / temperature, dim=1)
        soft = nn.functional.log_softmax(logits / temperature, dim=1)
        kl = nn.functional.kl_div(soft, targets, reduction="batchmean", log_target=True)
        return alpha * temperature**2 * kl + (1 - alpha) * nn.functional.cross_entropy(logits, labels)

    return fine_tune(student, loader, epochs, lr, loss)
