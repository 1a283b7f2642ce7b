"""Fine-tuning methods: a base model given a new head sized to the target's classes, then adapted through Hugging Face
peft (lora, adalora, loha, ia3) or trained as a baseline (linear_probe: the head alone; full: every weight; scratch:
the same architecture from fresh weights). `merged` folds adapters back into plain layers, so the result is the base
architecture again and exports, compresses and predicts like any kiln model."""

from __future__ import annotations

import copy
import io
import pkgutil
from collections.abc import Callable
from typing import Any

import peft
import torch
from torch import nn

from kiln.core.errors import InputError
from kiln.core.params import AdapterParams
from kiln.finetune.catalog import METHODS

ADAPTABLE = (nn.Conv2d, nn.Linear)  # what every peft family here adapts; AdaLoRA takes Linear only


def head_name(model: nn.Module) -> str:
    """The dotted name of the classifier head: the model's last Linear layer."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][-1]


def with_new_head(base: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of `base` whose head is a fresh Linear layer (seeded) giving `num_classes` logits."""
    model, name = copy.deepcopy(base), head_name(base)
    parent_name, _, leaf = name.rpartition(".")
    old = model.get_submodule(name)
    torch.manual_seed(seed)
    setattr(model.get_submodule(parent_name), leaf, nn.Linear(old.in_features, num_classes))
    return model


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, method: str, settings: AdapterParams) -> None:
    """Raise InputError naming finetune.adapters.METHOD.target_modules when a name matches no adaptable layer."""
    allowed = (nn.Linear,) if METHODS[method].linear_only else ADAPTABLE
    kinds = " or ".join(kind.__name__ for kind in allowed)
    layers = [name for name, module in model.named_modules() if isinstance(module, allowed)]
    for target in settings.target_modules:
        found = [module for name, module in model.named_modules() if _matches(name, target)]
        if not found or not all(isinstance(module, allowed) for module in found):
            what = f"it is a {type(found[0]).__name__}" if found else "no layer has that name"
            raise InputError(f"finetune.adapters.{method}.target_modules: {target!r} matches no {kinds} layer of the "
                             f"base ({what}); its {kinds} layers: {', '.join(layers)}")


Builder = Callable[[nn.Module, str, AdapterParams | None, int, int], nn.Module]  # a catalog entry's builder


def lora(model: nn.Module, head: str, settings: AdapterParams, seed: int, total_steps: int) -> nn.Module:
    return _peft(model, seed, peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                              lora_dropout=settings.dropout, **_targets(settings, head)))


def adalora(model: nn.Module, head: str, settings: AdapterParams, seed: int, total_steps: int) -> nn.Module:
    """Ranks are pruned from `rank` to `target_rank` over the middle of training."""
    return _peft(model, seed, peft.AdaLoraConfig(
        init_r=settings.rank, target_r=settings.target_rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        total_step=total_steps, tinit=total_steps // 5, tfinal=total_steps // 5, **_targets(settings, head)))


def loha(model: nn.Module, head: str, settings: AdapterParams, seed: int, total_steps: int) -> nn.Module:
    return _peft(model, seed, peft.LoHaConfig(r=settings.rank, alpha=settings.alpha, module_dropout=settings.dropout,
                                              **_targets(settings, head)))


def ia3(model: nn.Module, head: str, settings: AdapterParams, seed: int, total_steps: int) -> nn.Module:
    return _peft(model, seed, peft.IA3Config(feedforward_modules=[], **_targets(settings, head)))


def linear_probe(model: nn.Module, head: str, settings: None, seed: int, total_steps: int) -> nn.Module:
    model.requires_grad_(False)
    model.get_submodule(head).requires_grad_(True)
    return model


def full(model: nn.Module, head: str, settings: None, seed: int, total_steps: int) -> nn.Module:
    return model


def scratch(model: nn.Module, head: str, settings: None, seed: int, total_steps: int) -> nn.Module:
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


def _targets(settings: AdapterParams, head: str) -> dict[str, Any]:
    return {"target_modules": settings.target_modules, "modules_to_save": [head]}


def _peft(model: nn.Module, seed: int, config: peft.PeftConfig) -> nn.Module:
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def adapt(base: nn.Module, method: str, num_classes: int, adapters: dict[str, AdapterParams], seed: int,
          total_steps: int) -> nn.Module:
    """The model `method` trains: `base` with a new head, made ready by the method's builder (kiln.finetune.catalog):
    wrapped by peft, or with the right weights trainable."""
    model = with_new_head(base, num_classes, seed)
    builder: Builder = pkgutil.resolve_name(METHODS[method].builder)
    return builder(model, head_name(model), adapters.get(method), seed, total_steps)


def step_hook(model: nn.Module, method: str) -> Any:
    """AdaLoRA's rank allocation after every optimiser step, or None for the other methods."""
    if method != "adalora":
        return None
    inner = model.module if hasattr(model, "module") else model
    step = [0]

    def allocate() -> None:
        step[0] += 1
        inner.base_model.update_and_allocate(step[0])

    return allocate


def merged(model: nn.Module) -> nn.Module:
    """The plain model: adapters folded into their layers (merge_and_unload), every weight trainable again."""
    plain = copy.deepcopy(model)
    plain = plain.merge_and_unload() if isinstance(plain, peft.PeftModel) else plain
    return plain.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def saved_bytes(model: nn.Module, method: str) -> int:
    """Size on disk of what the method adds to the base: its adapters and head (peft), the head (linear_probe), or
    the whole model (full, scratch)."""
    if isinstance(model, peft.PeftModel):
        state = peft.get_peft_model_state_dict(model)
    elif method == "linear_probe":
        state = model.get_submodule(head_name(model)).state_dict()
    else:
        state = model.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()
