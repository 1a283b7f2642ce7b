"""Knowledge distillation: the loss that trains a pruned model or a thinner student on the teacher's softened logits,
plugged into the one training loop through its loss hook."""

from __future__ import annotations

import torch
from torch import nn

from kiln.train.loop import Loss


def distillation_loss(teacher: nn.Module, temperature: float, alpha: float) -> Loss:
    """alpha * T^2 * KL(teacher || student, both softened by temperature T) + (1 - alpha) * cross-entropy, with the
    teacher in eval mode and without gradients."""
    teacher.eval()

    def loss(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            targets = nn.functional.log_softmax(teacher(images) / temperature, dim=1)
        soft = nn.functional.log_softmax(logits / temperature, dim=1)
        kl = nn.functional.kl_div(soft, targets, reduction="batchmean", log_target=True)
        return alpha * temperature**2 * kl + (1 - alpha) * nn.functional.cross_entropy(logits, labels)

    return loss
