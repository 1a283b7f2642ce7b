"""Adversarial examples (FGSM, PGD) in pixel space: models take pixels in [0, 1] and normalise inside themselves."""

from __future__ import annotations

import torch
from torch import nn


def _gradient_sign(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    images = images.detach().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(images), labels)
    (grad,) = torch.autograd.grad(loss, images)
    return grad.sign()


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Fast Gradient Sign Method: one step of size `epsilon` up the loss, clipped to [0, 1]."""
    return (images + epsilon * _gradient_sign(model, images, labels)).clamp(0, 1).detach()


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float, steps: int = 7,
        step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected Gradient Descent (L-inf): a random start in the epsilon ball, then `steps` signed-gradient steps of
    `step_size` (default 2.5 * epsilon / steps), each projected back into the ball and [0, 1]."""
    step_size = 2.5 * epsilon / steps if step_size is None else step_size
    noise = torch.rand(images.shape, generator=generator, dtype=images.dtype, device=images.device) * 2 - 1
    adversarial = (images + epsilon * noise).clamp(0, 1)
    for _ in range(steps):
        adversarial = adversarial + step_size * _gradient_sign(model, adversarial, labels)
        adversarial = torch.min(torch.max(adversarial, images - epsilon), images + epsilon).clamp(0, 1).detach()
    return adversarial
