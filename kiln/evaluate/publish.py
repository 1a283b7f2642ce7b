"""Publishing a deployable: in the active MLflow run, its ONNX model (what batch inference loads, with signature and
pinned requirements) and the PyTorch weights it came from (SOURCE_MODEL, what a fine-tune starts from), registered as
a new version whose aliases the registry's gate moves.

A version's lineage is the DVC experiment its pipeline run is saved as. The run that registers it names that
experiment in the environment: KILN_EXPERIMENT (`kiln run` and the flow, which save and record it when the run ends,
kiln.platform.lineage) or DVC's own DVC_EXP_NAME (`dvc exp run`, which saves it as a ref it names beforehand). A
version's `kiln.git_commit` is that experiment's commit, set when it is recorded, never the working tree's
HEAD-dirty."""

from __future__ import annotations

import os
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

from kiln.evaluate.gate import Decision, Gate
from kiln.evaluate.registry import promote

SOURCE_MODEL = "source/model.pt"  # where a registered version's run keeps the PyTorch weights it came from
EXPERIMENT_ENV = "KILN_EXPERIMENT"


def pinned(*packages: str) -> list[str]:
    """pip requirements pinning the installed versions (MLflow would otherwise infer them, slowly)."""
    return [f"{name}=={version(name)}" for name in packages]


def experiment_tags() -> dict[str, str]:
    """The lineage tags known when a version is registered: the experiment the run will be saved as, and for
    `dvc exp run` the ref DVC will save it under and the repository it lives in (the commit follows from the ref)."""
    if name := os.environ.get(EXPERIMENT_ENV):
        return {"kiln.experiment": name}
    if name := os.environ.get("DVC_EXP_NAME"):
        baseline = os.environ["DVC_EXP_BASELINE_REV"]
        return {"kiln.experiment": name, "kiln.experiment_ref": f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}",
                "kiln.git_remote": os.environ.get("DVC_ROOT", os.getcwd())}
    return {}


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
    tags = {key: value for key, value in tags.items() if key != "kiln.git_commit"}  # the working tree's, maybe -dirty
    registered = mlflow.register_model(info.model_uri, name, tags={**tags, **experiment_tags()})
    return promote(MlflowClient(), name, registered.version, gate)
