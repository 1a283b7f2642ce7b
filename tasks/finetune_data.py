"""Stage `finetune_data`: the fine-tuning target (finetune.target, the same keys as `prepare`), read, resized to the
base's input size, split and written into --out with its manifest, all at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core.params import Params
from kiln.prepare.write import write_prepared


def run(params: Params, out: Path) -> dict[str, Any]:
    """Write the target's train/val/test splits and manifest; returns the manifest."""
    return write_prepared(params.finetune.target, out, "finetune_data")
