"""Batch inference: `kiln predict INPUT [--output predictions.csv] [--model-uri models:/kiln@champion] [--task T]`.

Classifies an `.npy` array or a folder of PNG/JPEG images (kiln.serve.images) with a registered ONNX model or an ONNX
file through ONNX Runtime (kiln.serve; a multi-task model: its `--task` head, the output `logits_<task>`), and writes
`item,predicted,confidence` rows. The input is checked against the model's (C, H, W) before anything runs; on any
error the CLI prints it without a traceback, exits 1, and leaves no CSV behind (an existing one is kept as it was).
"""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

from kiln.core.files import atomic_path
from kiln.serve.classify import Classifier
from kiln.serve.images import read_input
from kiln.serve.model import load_model


def predict(input_path: Path, output: Path, model_uri: str, task: str | None = None) -> int:
    """Classify `input_path` with `model_uri` (a multi-task model: its `task` head) and write the predictions CSV
    atomically; returns the item count."""
    with tempfile.TemporaryDirectory(prefix="kiln-predict-") as workdir:
        model = load_model(model_uri, Path(workdir))
        classifier = Classifier(model, task)
        items, images = read_input(input_path, model.chw)
        labels, confidence = classifier(images)
    with atomic_path(output) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "predicted", "confidence"])
        writer.writerows((item, label, f"{score:.6f}") for item, label, score in zip(items, labels, confidence,
                                                                                       strict=True))
    return len(items)
