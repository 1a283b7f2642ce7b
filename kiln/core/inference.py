"""A model as a logits function over float32 NCHW pixels in [0, 1]: torch eager, or an ONNX Runtime session.

ONNX Runtime sessions run every graph optimisation, sequentially, on as many intra-op threads as torch uses (both
default to the physical cores), so ORT and torch eager timings get the same CPU. Their threads do not spin-wait after
a call: kiln times several sessions side by side in one process, and the threads of the session that just ran,
spinning, took the cores from the next one (on 2 cores, batch-64 p50s of two identical models differed 1.7x from one
round to the next; without spinning they agree within 1%). It costs ~17 us per batch-1 call on the stock CNN.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from kiln.core.errors import reading

Logits = Callable[[np.ndarray], np.ndarray]  # float32 NCHW pixels in [0, 1] -> logits
INPUT, OUTPUT = "pixels", "logits"  # the names of an exported model's input and output (a multi-task model's:
                                    # OUTPUT_<task>, one per task)
BATCH = 256  # images per call when scoring a whole split: amortises per-call overhead; results do not depend on it


def torch_logits(model: nn.Module) -> Logits:
    """Eager inference of `model`, switched to eval mode."""
    model.eval()

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images)).numpy()

    return run


def session_options() -> ort.SessionOptions:
    """All graph optimisations, sequential execution, as many intra-op threads as torch uses, none spinning."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = torch.get_num_threads()
    return options


def output_names(tasks: list[str]) -> list[str]:
    """The outputs of an exported model: `logits`, or `logits_<task>` per task of a multi-task model."""
    return [f"{OUTPUT}_{task}" for task in tasks] or [OUTPUT]


def onnx_logits(path: Path, task: str | None = None) -> Logits:
    """Inference through an ONNX Runtime CPU session opened once: the logits, a multi-task model's side by side in
    output order, or one `task`'s alone."""
    with reading(path, "re-run `dvc repro compress` (or `dvc checkout` it) to write it again"):
        session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    if task is not None:
        if f"{OUTPUT}_{task}" not in names:
            raise ValueError(f"{path} has no output for task {task!r}; its outputs: {', '.join(names)}")
        names = [f"{OUTPUT}_{task}"]
    return lambda images: np.concatenate(session.run(names, {INPUT: images}), axis=1)


def predict_batches(run: Logits, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """`run` over `images` in batches, logits concatenated."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    return np.concatenate([run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def predict_onnx(path: Path, images: np.ndarray, batch_size: int = BATCH) -> np.ndarray:
    """Logits of the ONNX model at `path` for float32 NCHW images in [0, 1]."""
    return predict_batches(onnx_logits(path), images, batch_size)


def accuracy(run: Logits, images: np.ndarray, labels: np.ndarray, columns: slice = slice(None)) -> float:
    """Top-1 accuracy of `run` on float32 `images`, of its logits' `columns` (one task's of a multi-task model)."""
    return float((predict_batches(run, images)[:, columns].argmax(1) == labels).mean())
