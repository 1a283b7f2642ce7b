"""The base model of a fine-tune: a version of a registered model and the
PyTorch weights its evaluate run kept (`source/model.pt`, what the registered deployable was compressed from). Nothing
is downloaded from outside the tracking store."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from torch import nn

from kiln.core.errors import InputError
from kiln.core.models import load_trained_model, task_heads
from kiln.evaluate.publish import SOURCE_MODEL


@dataclass(frozen=True)
class Base:
    name: str
    version: str
    run_id: str  # the registered version's run
    model: nn.Module
    saved: dict[str, Any]  # the saved model's spec and lineage (train run, tune run, hyperparameters)
    datasets: tuple[str, ...] | None  # what it learnt from (its version's kiln.datasets tag); None: not recorded

    @property
    def tags(self) -> dict[str, str]:
        """Lineage tags of whatever is fine-tuned from this base."""
        return {"kiln.base_model": self.name, "kiln.base_version": self.version, "kiln.base_run_id": self.run_id,
                "kiln.base_train_run_id": str(self.saved.get("mlflow_run_id", ""))}


def load_base(client: MlflowClient, name: str, version: str) -> Base:
    """Load version `version` of registered model `name`: its PyTorch weights (weights only, never pickled code)."""
    registered = client.get_model_version(name, version)
    run_id, datasets = registered.run_id, registered.tags.get("kiln.datasets")
    with tempfile.TemporaryDirectory(prefix="kiln-base-") as folder:
        try:
            path = client.download_artifacts(run_id, SOURCE_MODEL, folder)
        except (MlflowException, OSError):
            raise InputError(f"finetune.base: {name} v{version} (run {run_id}) keeps no {SOURCE_MODEL}; it was "
                             "registered before evaluate kept the PyTorch weights: re-run evaluate, or fine-tune "
                             "a newer version") from None
        model, saved = load_trained_model(path)
    if task_heads(model):
        raise InputError(f"finetune.base: {name} v{version} is a multi-task model (heads: "
                         f"{', '.join(task_heads(model))}); fine-tuning takes a single-task base")
    return Base(name, version, run_id, model, saved, tuple(datasets.split(",")) if datasets else None)
