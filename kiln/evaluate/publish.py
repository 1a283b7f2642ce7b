"""Publishing a deployable: in the active MLflow run, its ONNX model (what batch inference loads, with signature and
pinned requirements) and the PyTorch weights it came from (SOURCE_MODEL, what a fine-tune starts from), registered as
a new version whose aliases the registry's gate moves."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.models import infer_signature

from kiln.core.params import Params
from kiln.evaluate.registry import Decision, Gate, promote

SOURCE_MODEL = "source/model.pt"  # where a registered version's run keeps the PyTorch weights it came from


def pinned(*packages: str) -> list[str]:
    """pip requirements pinning the installed versions (MLflow would otherwise infer them, slowly)."""
    return [f"{name}=={version(name)}" for name in packages]


def promotion_gate(params: Params) -> Gate:
    """The promotion gate every registration passes (evaluate.gate_metric, gate_margin, gate_alpha)."""
    return Gate(params.evaluate.gate_metric, params.evaluate.gate_margin, params.evaluate.gate_alpha)


def register_onnx(onnx_file: Path, source_model: Path, logits: Callable[[np.ndarray], np.ndarray],
                  example: np.ndarray, classes: list[str], name: str, tags: dict[str, str], gate: Gate) -> Decision:
    """Log the ONNX model and its source weights in the active run, register it as a version of `name` (tagged
    `tags`) and let `gate` move the aliases; returns the gate's decision."""
    with tempfile.TemporaryDirectory(prefix="kiln-source-") as folder:
        source = Path(folder) / Path(SOURCE_MODEL).name
        shutil.copyfile(source_model, source)
        mlflow.log_artifact(str(source), str(Path(SOURCE_MODEL).parent))
    info = mlflow.onnx.log_model(onnx.load(str(onnx_file)), name="model", input_example=example,
                                 metadata={"classes": classes}, signature=infer_signature(example, logits(example)),
                                 pip_requirements=pinned("onnx", "onnxruntime"))
    registered = mlflow.register_model(info.model_uri, name, tags=tags)
    return promote(MlflowClient(), name, registered.version, gate)
