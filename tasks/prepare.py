"""Stage `prepare`: read and validate the raw dataset (prepare.data_dir; DVC tracks data/raw), resize it when
prepare.image_side says so, split it, and write the split .npz files and manifest.json into --out, all at once; a
multi-task run (train.tasks) writes every task's, the others under --out/tasks/<name>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core.params import Params
from kiln.prepare.write import write_prepared


def run(params: Params, out: Path) -> dict[str, Any]:
    """Write the train/val/test splits and the manifest; returns the manifest."""
    return write_prepared(params.prepare, out, "prepare", list(params.task_weights))
