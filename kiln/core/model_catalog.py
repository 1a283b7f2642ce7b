"""The model zoo's catalog, next to the zoo (kiln.core.models). Torch-free: params validation reads it. A new
architecture is a class taking `(in_channels, num_classes, image_size, widths, dropout)` and an entry here."""

from __future__ import annotations

MODELS: dict[str, str] = {  # name -> "module:class"
    "lenet": "kiln.core.models:LeNet",
    "compact": "kiln.core.models:CompactCNN",  # CPU-sized
    "resnet": "kiln.core.models:SmallResNet",  # ResNet-8
}
TORCHVISION_PREFIX = "torchvision:"  # or torchvision:<name>, checked against torchvision when training starts
