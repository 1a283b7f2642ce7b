"""Classifying images with a served model: each image's predicted class name and the softmax confidence in it."""

from __future__ import annotations

import numpy as np

from kiln.core.inference import onnx_logits, predict_batches
from kiln.serve.model import ServedModel, task_output


class Classifier:
    """`model`'s ONNX Runtime session, opened once (a multi-task model's `task` head): images -> predictions."""

    def __init__(self, model: ServedModel, task: str | None = None) -> None:
        self.task = task_output(model, task)
        self.logits = onnx_logits(model.path, self.task)
        classes = model.classes
        if self.task is not None and isinstance(classes, dict):
            classes = classes.get(self.task)
        self.classes = classes

    def __call__(self, images: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(class name, or index when the model records none; confidence) of each float32 NCHW image in [0, 1]."""
        logits = predict_batches(self.logits, images)
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        confidence = (shifted / shifted.sum(1, keepdims=True)).max(1)
        names = self.classes or [str(index) for index in range(logits.shape[1])]
        return [names[label] for label in logits.argmax(1)], confidence
