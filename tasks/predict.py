"""Batch inference: `kiln predict INPUT [--output predictions.csv] [--model-uri models:/kiln@champion] [--task T]`.

Classifies an `.npy` array (uint8 0..255 or float in [0, 1]; (N, C, H, W), or (N, H, W) for one channel) or a
folder of PNG/JPEG images with a registered ONNX model through ONNX Runtime (a multi-task model: its `--task` head,
the output `logits_<task>`), and writes `item,predicted,confidence` rows. The input is checked against the model's
(C, H, W) before anything runs; on any error the CLI prints it without a traceback, exits 1, and leaves no CSV behind
(an existing one is kept as it was).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from PIL import Image

from kiln.core.errors import InputError
from kiln.core.files import atomic_path
from kiln.core.inference import OUTPUT, onnx_logits, predict_batches
from kiln.core.tracking import tracking_uri

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class ModelUnavailable(InputError):
    """The model URI does not resolve to an ONNX model in the tracking store."""


class UnreadableInput(InputError):
    """The input is missing, empty, or a file that cannot be read as an array or image."""


class TaskMismatch(InputError):
    """--task names no output of the model, or a multi-task model was given no --task."""


class ShapeMismatch(InputError):
    """The images' size or channel count differs from the model's input."""


def load_model(model_uri: str, workdir: Path) -> tuple[Path, tuple[int, int, int], list[str] | dict | None]:
    """Download the model into `workdir`: (ONNX file, its fixed input (C, H, W), class names if recorded: a
    multi-task model's by task)."""
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
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    chw = tuple(dim.dim_value for dim in dims[1:])
    if len(chw) != 3 or 0 in chw:
        raise ModelUnavailable(f"{model_uri}: input {[d.dim_value or d.dim_param for d in dims]} is not (N, C, H, W)")
    return path, chw, (model.metadata or {}).get("classes")


def _as_pixels(array: np.ndarray, source: Path) -> np.ndarray:
    """uint8 0..255 or float 0..1 -> float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise UnreadableInput(f"{source}: dtype {array.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
        raise UnreadableInput(f"{source}: float pixels must lie in [0, 1] (got {array.min()}..{array.max()})")
    return array.astype(np.float32)


def read_array(path: Path, chw: tuple[int, int, int]) -> np.ndarray:
    """An `.npy` array as float32 (N, C, H, W), checked against the model's (C, H, W)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UnreadableInput(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise UnreadableInput(f"{path}: an .npz archive, not a single .npy array")
    shape = array.shape
    if array.ndim == 3 and chw[0] == 1:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1:] != chw:
        expected = f"(N, {chw[0]}, {chw[1]}, {chw[2]})" + (f" or (N, {chw[1]}, {chw[2]})" if chw[0] == 1 else "")
        raise ShapeMismatch(
            f"{path}: array of shape {shape}, but the model expects {expected}, "
            f"i.e. {chw[0]} channel(s) of {chw[1]}x{chw[2]} pixels"
        )
    if len(array) == 0:
        raise UnreadableInput(f"{path}: holds no images")
    return _as_pixels(array, path)


def read_folder(folder: Path, chw: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(file names, float32 (N, C, H, W)) of the PNG/JPEG images in `folder`, converted to the model's channels."""
    mode = {1: "L", 3: "RGB"}.get(chw[0])
    if mode is None:
        raise ShapeMismatch(f"the model takes {chw[0]} channels; image folders can feed only 1 (L) or 3 (RGB)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UnreadableInput(f"{folder}: no PNG or JPEG images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    pixels = []
    for file in files:
        try:
            with Image.open(file) as image:
                converted = image.convert(mode)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UnreadableInput(f"{file}: not a readable image ({exc})") from None
        if converted.size != (chw[2], chw[1]):
            width, height = converted.size
            raise ShapeMismatch(f"{file}: image is {width}x{height} pixels, the model expects {chw[2]}x{chw[1]}")
        pixels.append(np.asarray(converted).reshape(chw[1], chw[2], chw[0]).transpose(2, 0, 1))
    return [file.name for file in files], _as_pixels(np.stack(pixels), folder)


def read_input(path: Path, chw: tuple[int, int, int]) -> tuple[list[str], np.ndarray]:
    """(item names, float32 images) from an `.npy` file (items are indices) or a folder of images."""
    if path.is_dir():
        return read_folder(path, chw)
    if not path.exists():
        raise UnreadableInput(f"{path}: no such file or folder")
    if path.suffix.lower() != ".npy":
        raise UnreadableInput(f"{path}: expected an .npy array or a folder of PNG/JPEG images")
    images = read_array(path, chw)
    return [str(index) for index in range(len(images))], images


def task_output(onnx_path: Path, model_uri: str, task: str | None) -> str | None:
    """The task whose head predicts: None for a single-task model (which takes no --task), a multi-task model's
    `task`; raises InputError naming the tasks when it is missing or not one of them."""
    outputs = [output.name for output in onnx.load(str(onnx_path), load_external_data=False).graph.output]
    tasks = [name.removeprefix(f"{OUTPUT}_") for name in outputs if name != OUTPUT]
    if not tasks:
        if task is not None:
            raise TaskMismatch(f"--task {task}: {model_uri} is a single-task model; leave --task out")
        return None
    if task not in tasks:
        raise TaskMismatch(f"--task {task}: {model_uri} is a multi-task model; name one of its tasks: "
                           f"{', '.join(tasks)}" if task else
                           f"{model_uri} is a multi-task model: pass --task, one of {', '.join(tasks)}")
    return task


def predict(input_path: Path, output: Path, model_uri: str, task: str | None = None) -> int:
    """Classify `input_path` with `model_uri` (a multi-task model: its `task` head) and write the predictions CSV
    atomically; returns the item count."""
    with tempfile.TemporaryDirectory(prefix="kiln-predict-") as workdir:
        onnx_path, chw, classes = load_model(model_uri, Path(workdir))
        task = task_output(onnx_path, model_uri, task)
        items, images = read_input(input_path, chw)
        logits = predict_batches(onnx_logits(onnx_path, task), images)
    if task is not None and isinstance(classes, dict):
        classes = classes.get(task)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    confidence = (shifted / shifted.sum(1, keepdims=True)).max(1)
    names = classes or [str(index) for index in range(logits.shape[1])]
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "predicted", "confidence"])
        writer.writerows(
            (item, names[label], f"{score:.6f}")
            for item, label, score in zip(items, logits.argmax(1), confidence, strict=True)
        )
    return len(items)
