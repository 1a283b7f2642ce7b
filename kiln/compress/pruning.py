"""Pruning (plain PyTorch): global magnitude pruning of any model, and channel pruning of plain CNNs (lenet, compact),
each followed by a short fine-tune through the one training loop. Models are `nn.Sequential(Normalize, net)` as
`build_model` makes them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader

from kiln.core.models import PLAIN_CNNS, PlainCNN
from kiln.train.loop import Hooks, Loss, run_epochs
from kiln.train.recipe import Recipe, make_optimizer

FINETUNE_MOMENTUM = 0.9  # Nesterov SGD as in training; fine-tunes are short and unscheduled, so it is not tuned


def _layers(model: nn.Module) -> list[nn.Conv2d | nn.Linear]:
    return [module for module in model.modules() if isinstance(module, nn.Conv2d | nn.Linear)]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def sparsity(model: nn.Module) -> float:
    """Fraction of zeros among the weights of every conv and linear layer."""
    weights = [layer.weight for layer in _layers(model)]
    return sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)


def fine_tune(model: nn.Module, loader: DataLoader, epochs: int, lr: float, loss_fn: Loss | None = None) -> nn.Module:
    """Train `model` in place for `epochs` with SGD (Nesterov momentum, no weight decay); returns it in eval mode."""
    optimizer = make_optimizer(model, Recipe(lr=lr, momentum=FINETUNE_MOMENTUM, weight_decay=0.0))
    run_epochs(model, optimizer, loader, epochs, Recipe(), hooks=Hooks(loss=loss_fn))
    return model.eval()


def magnitude_prune(model: nn.Module, amount: float, loader: DataLoader, epochs: int, lr: float) -> nn.Module:
    """A copy of `model` with the `amount` fraction of smallest conv and linear weights (ranked globally) set to zero,
    fine-tuned with the mask held, then made permanent."""
    pruned = copy.deepcopy(model)
    targets = [(layer, "weight") for layer in _layers(pruned)]
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    fine_tune(pruned, loader, epochs, lr)
    for layer, name in targets:
        prune.remove(layer, name)
    return pruned


def plain_cnn(model: nn.Module) -> PlainCNN:
    net = model[1]
    if not isinstance(net, PlainCNN):
        raise TypeError(f"channel pruning and distillation need a plain CNN ({', '.join(PLAIN_CNNS)}), "
                        f"not {type(net).__name__}")
    return net


def _strongest(conv: nn.Conv2d, keep: float) -> torch.Tensor:
    """Sorted indices of the `keep` fraction (at least one) of `conv`'s output channels with the largest L1 norm."""
    norms = conv.weight.detach().abs().sum(dim=(1, 2, 3))
    return norms.topk(max(1, round(len(norms) * keep))).indices.sort().values


def channel_prune(model: nn.Module, keep: float, loader: DataLoader, epochs: int, lr: float) -> nn.Module:
    """A smaller plain CNN: each conv keeps its `keep` fraction of output channels with the largest L1 norm; its
    batch norm, the next conv and the first linear layer keep the matching entries; then fine-tuned."""
    net = plain_cnn(model)
    state, kept, widths = net.state_dict(), torch.arange(net.arguments["in_channels"]), []
    for index, layer in enumerate(net.features):
        prefix = f"features.{index}."
        if isinstance(layer, nn.Conv2d):
            channels = _strongest(layer, keep)
            state[prefix + "weight"] = state[prefix + "weight"][channels][:, kept]
            if layer.bias is not None:
                state[prefix + "bias"] = state[prefix + "bias"][channels]
            kept = channels
            widths.append(len(channels))
        elif isinstance(layer, nn.BatchNorm2d):
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[prefix + name] = state[prefix + name][kept]
    index, linear = next((i, layer) for i, layer in enumerate(net.classifier) if isinstance(layer, nn.Linear))
    convs = [layer for layer in net.features if isinstance(layer, nn.Conv2d)]
    area = linear.in_features // convs[-1].out_channels  # Flatten is channel-major
    columns = (kept[:, None] * area + torch.arange(area)).flatten()
    state[f"classifier.{index}.weight"] = state[f"classifier.{index}.weight"][:, columns]
    small = nn.Sequential(copy.deepcopy(model[0]), net.with_widths([*widths, *net.widths[len(widths):]]))
    small[1].load_state_dict(state)
    return fine_tune(small, loader, epochs, lr)
