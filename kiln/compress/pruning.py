"""Structured pruning with Torch-Pruning's dependency graph: whole channels leave every coupled layer (the next conv,
batch norm, a residual add's other branch, the flattening linear), so the pruned model is a smaller dense network
that runs faster anywhere. Works for every model of the zoo; MACs are counted by Torch-Pruning's counter alone.

The same tool thins a model into a distillation student: uniformly pruned to a MACs target, then re-initialised.
A pruned model's structure lives in its state_dict's shapes, so `resized` rebuilds it from a freshly built model and
a plain tensor checkpoint (kiln's checkpoints load with `weights_only=True`).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

STEP = 0.025  # channels pruned per step, as a fraction of each layer's width when a round starts
# Widths that are all multiples of 16 (else 8) stay so when the target allows: ONNX Runtime's fp32 convs run in blocks
# of 16 channels with AVX-512, 8 with AVX2. Measured interleaved on the compact CNN: widths 16-16-32-64 ran 1.84x
# faster than 16-32-64-128 at batch 64, while 8-24-48-96, at half the MACs, ran no faster at all.
CHANNEL_MULTIPLES = (16, 8)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example` (one image), by Torch-Pruning's counter."""
    macs, _ = tp.utils.count_ops_and_params(model, example)
    return int(macs)


def output_layer(model: nn.Module) -> nn.Linear:
    """The classifier's last linear layer, whose outputs are the classes and so are never pruned."""
    return [module for module in model.modules() if isinstance(module, nn.Linear)][-1]


def _roundings(model: nn.Module) -> list[int | None]:
    """Channel multiples to try, coarsest first: those every prunable width already is a multiple of, then none."""
    widths = [layer.weight.shape[0] for layer in model.modules() if isinstance(layer, nn.Conv2d | nn.Linear)][:-1]
    return [m for m in CHANNEL_MULTIPLES if all(width % m == 0 for width in widths)] + [None]


def _prune(model: nn.Module, example: torch.Tensor, target_macs: float, multiple: int | None) -> int:
    """Prune `model` in place, a few channels of every layer per step (lowest L2 norm, ranked per coupled group), until
    its MACs are at most `target_macs` or no step is left; returns its MACs."""
    steps = round((1 - STEP) / STEP)
    pruner = tp.pruner.MagnitudePruner(
        model, example, tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=STEP * steps,
        iterative_steps=steps, ignored_layers=[output_layer(model)], round_to=multiple)
    macs = count_macs(model, example)
    for _ in range(steps):
        if macs <= target_macs:
            break
        pruner.step()
        macs = count_macs(model, example)
    return macs


def prune_to_macs(model: nn.Module, example: torch.Tensor, target_macs: float) -> nn.Module:
    """A copy of `model` (in eval mode) pruned to at most `target_macs` MACs, its widths kept at the coarsest channel
    multiple that reaches the target. Raises ValueError naming the floor when no pruning reaches it."""
    for multiple in _roundings(model):
        pruned = copy.deepcopy(model).eval()
        macs = _prune(pruned, example, target_macs, multiple)
        if macs <= target_macs:
            return pruned
    raise ValueError(f"cannot prune below {macs:,} MACs (target {target_macs:,.0f}): every prunable layer is at its "
                     f"narrowest")


def round_targets(full_macs: int, ratio: float, rounds: int) -> list[float]:
    """MACs targets of iterative pruning: geometric steps from `full_macs` to `ratio * full_macs` in `rounds`."""
    return [full_macs * ratio ** (step / rounds) for step in range(1, rounds + 1)]


def thinned(model: nn.Module, example: torch.Tensor, target_macs: float) -> nn.Module:
    """A freshly initialised copy of `model` with every layer uniformly narrower, at most `target_macs` MACs: a
    student of the same family (pretrained `model` untouched)."""
    student = prune_to_macs(model, example, target_macs)
    for module in student.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return student


def resized(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model` (built at full width) narrowed to the shapes in `state`, a pruned copy's state_dict, and loaded with
    it. Convs, linears and batch norms take their widths from their tensors; depthwise convs keep groups = channels."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            saved = state[prefix + key]
            if saved.shape != tensor.shape:
                value = torch.empty_like(saved)
                if isinstance(tensor, nn.Parameter):
                    module.register_parameter(key, nn.Parameter(value, requires_grad=tensor.requires_grad))
                else:
                    module.register_buffer(key, value)
        if isinstance(module, nn.Conv2d):
            depthwise = module.groups > 1 and module.groups == module.out_channels
            module.out_channels = module.weight.shape[0]
            module.groups = module.out_channels if depthwise else module.groups
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.BatchNorm2d):
            module.num_features = module.running_mean.shape[0]
    model.load_state_dict(state)
    return model
