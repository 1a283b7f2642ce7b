"""The model a prediction runs: a registered ONNX model (an MLflow URI) or an ONNX file, with its fixed input shape,
its class names when recorded, and the task whose head predicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
import onnx
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from kiln.core.errors import InputError
from kiln.core.inference import OUTPUT
from kiln.core.tracking import tracking_uri


class ModelUnavailable(InputError):
    """The model URI does not resolve to an ONNX model in the tracking store."""


class TaskMismatch(InputError):
    """--task names no output of the model, or a multi-task model was given no --task."""


@dataclass(frozen=True)
class ServedModel:
    """An ONNX model ready to open: its file, fixed input (C, H, W) and class names (a multi-task model's by task)."""

    source: str  # the URI or file it came from, as messages name it
    path: Path
    chw: tuple[int, int, int]
    classes: list[str] | dict[str, list[str]] | None


def input_shape(path: Path, source: str) -> tuple[int, int, int]:
    """The (C, H, W) of the ONNX model's input; ModelUnavailable unless it is a fixed (N, C, H, W)."""
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    chw = tuple(dim.dim_value for dim in dims[1:])
    if len(chw) != 3 or 0 in chw:
        raise ModelUnavailable(f"{source}: input {[d.dim_value or d.dim_param for d in dims]} is not (N, C, H, W)")
    return chw


def from_registry(model_uri: str, workdir: Path) -> ServedModel:
    """Download the MLflow model `model_uri` (models:/NAME@ALIAS, runs:/...) into `workdir`."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve through the global registry URI, whatever is passed
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(workdir)))
    except MlflowException as exc:
        raise ModelUnavailable(f"cannot load {model_uri} from {uri}: {exc.message}") from None
    model = Model.load(local)
    if "onnx" not in model.flavors:
        raise ModelUnavailable(f"{model_uri} is not an ONNX model (flavors: {', '.join(model.flavors)})")
    path = local / model.flavors["onnx"]["data"]
    return ServedModel(model_uri, path, input_shape(path, model_uri), (model.metadata or {}).get("classes"))


def load_model(source: str, workdir: Path) -> ServedModel:
    """An ONNX file as it is (no class names: predictions are indices), anything else from MLflow into `workdir`."""
    path = Path(source)
    if path.suffix == ".onnx" and path.is_file():
        return ServedModel(source, path, input_shape(path, source), None)
    return from_registry(source, workdir)


def task_output(model: ServedModel, task: str | None) -> str | None:
    """The task whose head predicts: None for a single-task model (which takes no --task), a multi-task model's
    `task`; raises TaskMismatch naming the tasks when it is missing or not one of them."""
    outputs = [output.name for output in onnx.load(str(model.path), load_external_data=False).graph.output]
    tasks = [name.removeprefix(f"{OUTPUT}_") for name in outputs if name != OUTPUT]
    if not tasks:
        if task is not None:
            raise TaskMismatch(f"--task {task}: {model.source} is a single-task model; leave --task out")
        return None
    if task not in tasks:
        raise TaskMismatch(f"--task {task}: {model.source} is a multi-task model; name one of its tasks: "
                           f"{', '.join(tasks)}" if task else
                           f"{model.source} is a multi-task model: pass --task, one of {', '.join(tasks)}")
    return task
