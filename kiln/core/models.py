"""Model zoo: every network takes float32 NCHW pixels in [0, 1] and normalises inside itself.

`lenet` and `compact` are plain CNNs (`features` then `classifier`, both nn.Sequential) whose `widths` list their conv
channels, then any hidden linear widths: compression builds thinner copies of them from those widths.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from kiln.core.errors import InputError, reading
from kiln.core.model_catalog import MODELS, TORCHVISION_PREFIX
from kiln.core.prepared import shared_normalization

PLAIN_CNNS = ("lenet", "compact")


class Normalize(nn.Module):
    """Per-channel standardisation baked into the model, so exported models need no preprocessing."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PlainCNN(nn.Module):
    """`features` then `classifier` (both nn.Sequential); `widths` lists the conv channels, then any hidden linear
    widths. `with_widths` builds a freshly initialised copy of other widths (for pruning and distillation)."""

    default_widths: tuple[int, ...] = ()

    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: Sequence[int] | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.widths = tuple(widths or self.default_widths)
        self.arguments = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size, dropout=dropout)
        self.features, self.classifier = self.layers(in_channels, num_classes, image_size, dropout)

    def layers(self, in_channels: int, num_classes: int, image_size: int,
               dropout: float) -> tuple[nn.Sequential, nn.Sequential]:
        raise NotImplementedError

    def with_widths(self, widths: Sequence[int]) -> PlainCNN:
        return type(self)(**self.arguments, widths=widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet(PlainCNN):
    """LeNet-style CNN: conv 6 -> conv 16 -> fc 120 -> 84 -> classes, for any channel count and size >= 4."""

    default_widths = (6, 16, 120, 84)

    def layers(self, in_channels: int, num_classes: int, image_size: int,
               dropout: float) -> tuple[nn.Sequential, nn.Sequential]:
        conv1, conv2, fc1, fc2 = self.widths
        side = image_size // 4
        return nn.Sequential(
            nn.Conv2d(in_channels, conv1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(conv1, conv2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        ), nn.Sequential(
            nn.Flatten(), nn.Linear(conv2 * side * side, fc1), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(fc1, fc2), nn.ReLU(), nn.Dropout(dropout), nn.Linear(fc2, num_classes),
        )


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 conv (padding 1, no bias), batch norm and ReLU."""
    return [nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]


class CompactCNN(PlainCNN):
    """A CNN sized for CPUs: three 3x3 conv-BN-ReLU blocks, max-pooling after the first two (most compute runs at a
    quarter of the resolution), then a flattening classifier with one hidden layer. Batch norm folds into the convs
    at export, so the deployed graph is conv, ReLU, pool and two matrix products."""

    default_widths = (16, 32, 64, 128)

    def layers(self, in_channels: int, num_classes: int, image_size: int,
               dropout: float) -> tuple[nn.Sequential, nn.Sequential]:
        c1, c2, c3, hidden = self.widths
        side = image_size // 4
        return nn.Sequential(
            *conv_bn(in_channels, c1), nn.MaxPool2d(2),
            *conv_bn(c1, c2), nn.MaxPool2d(2),
            *conv_bn(c2, c3),
        ), nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c3 * side * side, hidden), nn.ReLU(),
                         nn.Dropout(dropout), nn.Linear(hidden, num_classes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(in_channels, out_channels, stride),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.relu(self.body(x) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for 28x28/32x32 images: a 3x3 stem, three stages of `blocks` BasicBlocks (the second and
    third halve the resolution), global average pooling. blocks=1 is ResNet-8, blocks=3 ResNet-20."""

    default_widths = (16, 32, 64)

    def __init__(self, in_channels: int, num_classes: int, image_size: int, widths: Sequence[int] | None = None,
                 dropout: float = 0.0, blocks: int = 1) -> None:
        super().__init__()
        self.widths = tuple(widths or self.default_widths)
        layers = conv_bn(in_channels, self.widths[0])
        previous = self.widths[0]
        for stage, width in enumerate(self.widths):
            for index in range(blocks):
                layers.append(BasicBlock(previous, width, 2 if stage > 0 and index == 0 else 1))
                previous = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                        nn.Linear(previous, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _replace(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def torchvision_model(name: str, in_channels: int, num_classes: int, image_size: int, dropout: float) -> nn.Module:
    """torchvision's `name`, untrained, adapted to small images with any channel count: the first conv takes
    `in_channels` and, for images under 64 px, becomes a stride-1 3x3 conv and a stem max-pool is dropped; `dropout`
    goes before the last linear layer, on top of any dropout the architecture has."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown torchvision classification model {name!r}; "
                         f"see torchvision.models.list_models(module=torchvision.models)")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    stem_name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    head_name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    if dropout:
        _replace(model, head_name, nn.Sequential(nn.Dropout(dropout), head))
    small = image_size < 64
    _replace(model, stem_name, nn.Conv2d(in_channels, stem.out_channels, 3 if small else stem.kernel_size,
                                         1 if small else stem.stride, 1 if small else stem.padding, bias=False))
    if small and isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


class MultiTaskNet(nn.Module):
    """A zoo network's trunk (all of it but its last linear layer) shared by one linear head per task. The forward
    pass returns every head's logits side by side, in task order: `tasks` maps each task to its class count, so
    columns [offset, offset + count) are its logits (`kiln.core.multitask.TaskLayout` slices them)."""

    def __init__(self, net: nn.Module, tasks: dict[str, int]) -> None:
        super().__init__()
        head_name, head = [(name, m) for name, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
        _replace(net, head_name, nn.Identity())
        self.trunk, self.tasks = net, dict(tasks)
        self.heads = nn.ModuleDict({task: nn.Linear(head.in_features, count) for task, count in tasks.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads.values()], 1)


class TaskHead(nn.Module):
    """One task's logits of a multi-task model."""

    def __init__(self, model: nn.Module, columns: slice) -> None:
        super().__init__()
        self.model, self.columns = model, columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.columns]


class TaskOutputs(nn.Module):
    """A multi-task model with one output per task (its head's logits), for export: ONNX names each."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.counts = model, list(task_heads(model).values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.split(self.model(x), self.counts, dim=1))


def task_heads(model: nn.Module) -> dict[str, int]:
    """A multi-task model's tasks and their class counts, in output order; {} for a single-task model."""
    net = model[1] if isinstance(model, nn.Sequential) and len(model) > 1 else model
    return dict(net.tasks) if isinstance(net, MultiTaskNet) else {}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, mean: Sequence[float],
                std: Sequence[float], widths: Sequence[int] | None = None, dropout: float = 0.0,
                tasks: dict[str, int] | None = None) -> nn.Module:
    """Build model `name` (one of MODELS, or `torchvision:<name>`) for the given data shape, normalisation first;
    with `tasks` (task -> classes, two or more), its trunk with a head per task (num_classes: their sum)."""
    if name in MODELS:
        net = pkgutil.resolve_name(MODELS[name])(in_channels, num_classes, image_size, widths, dropout)
    elif name.startswith(TORCHVISION_PREFIX):
        net = torchvision_model(name.removeprefix(TORCHVISION_PREFIX), in_channels, num_classes, image_size, dropout)
    else:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)} or {TORCHVISION_PREFIX}<name>")
    return nn.Sequential(Normalize(mean, std), MultiTaskNet(net, tasks) if tasks else net)


def check_fits(model: nn.Module, in_channels: int, image_size: int, num_classes: int, name: str) -> None:
    """Raise ValueError naming the model and the data shape when `model` cannot classify such images."""
    try:
        with torch.no_grad():
            logits = model.eval()(torch.zeros(2, in_channels, image_size, image_size))
    except RuntimeError as exc:
        raise ValueError(f"model {name!r} cannot take {in_channels}x{image_size}x{image_size} images: {exc}") from None
    if tuple(logits.shape) != (2, num_classes):
        raise ValueError(f"model {name!r} gives logits shaped {tuple(logits.shape[1:])}, not ({num_classes},)")


def model_spec(name: str, manifest: dict[str, Any], dropout: float,
               tasks: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """build_model's arguments for the prepared data `manifest` describes, or, given two or more `tasks` (task ->
    its manifest), a head per task on normalisation shared by their training images; raises InputError naming
    `train.model` when the model cannot classify those images."""
    channels, side, _ = manifest["image_shape"]
    spec = dict(name=name, in_channels=channels, num_classes=len(manifest["classes"]), image_size=side,
                dropout=dropout, **manifest["normalization"])
    if tasks and len(tasks) > 1:
        heads = {task: len(task_manifest["classes"]) for task, task_manifest in tasks.items()}
        spec.update(num_classes=sum(heads.values()), tasks=heads,
                    **shared_normalization(list(tasks.values())))
    try:
        model = build_model(**spec)
        check_fits(model, channels, side, spec["num_classes"], name)
    except ValueError as exc:
        raise InputError(f"train.model: {exc}") from None
    net = model[1].trunk if isinstance(model[1], MultiTaskNet) else model[1]
    widths = getattr(net, "widths", None)  # recorded, so a saved model outlives a change of default widths
    return {**spec, "widths": None if widths is None else list(widths)}


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Start from a local state_dict (of the network, or of the whole model); tensors whose shape differs (an adapted
    stem or head) keep their fresh initialisation. Returns the names of the skipped tensors."""
    with reading(path, "point train.weights at a state_dict saved with torch.save"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
    saved = saved.get("state_dict", saved)
    target = model[1].state_dict()
    saved = {key.removeprefix("1."): value for key, value in saved.items()}
    usable = {key: value for key, value in saved.items() if key in target and target[key].shape == value.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor matches the model's parameters (by name and shape)")
    model[1].load_state_dict(usable, strict=False)
    return sorted(set(target) - set(usable))


def initial_state(weights: Path | None, spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The starting weights `train.weights` names (a local file), or None for a fresh initialisation; raises
    InputError naming train.weights when the file cannot give the model any tensor."""
    if weights is None:
        return None
    model = build_model(**spec)
    try:
        skipped = load_weights(model, weights)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"train.weights: {exc}") from None
    print(f"train: weights from {weights}; freshly initialised: {', '.join(skipped) or 'nothing'}")
    return model.state_dict()


def save_trained_model(path: str, model: nn.Module, spec: dict, extra: dict) -> None:
    """Save weights with everything needed to rebuild the model (`spec` = build_model kwargs)."""
    torch.save({"spec": spec, "state_dict": model.state_dict(), **extra}, path)


def load_trained_model(path: str) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_trained_model`; returns (model in eval mode, the saved dict)."""
    with reading(path, "re-run `dvc repro train` (or `dvc checkout models/model.pt`) to write it again"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(**saved["spec"])
        model.load_state_dict(saved["state_dict"])
    return model.eval(), saved
