"""Model zoo: every network takes float32 NCHW pixels in [0, 1] and normalises inside itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel standardisation baked into the model, so exported models need no preprocessing."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


LENET_WIDTHS = (6, 16, 120, 84)


class LeNet(nn.Module):
    """LeNet-style CNN: conv 6 -> conv 16 -> fc 120 -> 84 -> classes, for any channel count and size >= 4.

    `widths` (conv1, conv2, fc1, fc2) builds thinner variants: channel-pruned models and distillation students.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, widths: Sequence[int] = LENET_WIDTHS
    ) -> None:
        super().__init__()
        conv1, conv2, fc1, fc2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, conv1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(conv2 * side * side, fc1), nn.ReLU(),
            nn.Linear(fc1, fc2), nn.ReLU(), nn.Linear(fc2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Module:
    """Build model `name` for the given data shape, with normalisation as its first layer."""
    if name == "lenet":
        net = LeNet(in_channels, num_classes, image_size)
    else:
        raise ValueError(f"unknown model {name!r}; allowed: lenet")
    return nn.Sequential(Normalize(mean, std), net)


def save_trained_model(path: str, model: nn.Module, spec: dict, extra: dict) -> None:
    """Save weights with everything needed to rebuild the model (`spec` = build_model kwargs)."""
    torch.save({"spec": spec, "state_dict": model.state_dict(), **extra}, path)


def load_trained_model(path: str) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_trained_model`; returns (model in eval mode, the saved dict)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(**saved["spec"])
    model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
