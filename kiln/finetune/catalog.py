"""The fine-tuning methods, next to their builders (kiln.finetune.methods). Torch-free: params validation reads it. A
new method is a builder `(model, head, adapter settings, seed, total steps) -> model to train` and an entry here;
an adapter method also gets its settings under `finetune.adapters`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    builder: str  # "module:function" (kiln.finetune.methods.Builder)
    adapter: bool = False  # a peft adapter family, with settings under finetune.adapters.<name>
    linear_only: bool = False  # adapts nn.Linear layers alone (finetune.adapters.<name>.target_modules)


METHODS: dict[str, Method] = {
    "lora": Method("kiln.finetune.methods:lora", adapter=True),
    "adalora": Method("kiln.finetune.methods:adalora", adapter=True, linear_only=True),
    "loha": Method("kiln.finetune.methods:loha", adapter=True),
    "ia3": Method("kiln.finetune.methods:ia3", adapter=True),
    "linear_probe": Method("kiln.finetune.methods:linear_probe"),  # the new head alone
    "full": Method("kiln.finetune.methods:full"),  # every weight
    "scratch": Method("kiln.finetune.methods:scratch"),  # the same architecture from fresh weights
}
ADAPTERS: tuple[str, ...] = tuple(name for name, method in METHODS.items() if method.adapter)
