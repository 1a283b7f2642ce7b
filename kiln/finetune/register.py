"""Registering the selected fine-tune: in its method's run, its test metrics and paired predictions from the ONNX
model (what batch inference loads), then that model as a version of finetune.registered_model through evaluate's
gate."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from sklearn.metrics import f1_score

from kiln.core.inference import onnx_logits, predict_batches
from kiln.core.params import Params
from kiln.core.prepared import to_float
from kiln.evaluate.gate import Decision, Gate, predictions_record
from kiln.evaluate.publish import register_onnx
from kiln.evaluate.registry import PREDICTIONS


def register(params: Params, run_id: str, onnx_file: Path, model_file: Path, tags: dict[str, str], parent_id: str,
             x_test: np.ndarray, y_test: np.ndarray, classes: list[str]) -> Decision:
    """Log the selected method's test metrics and predictions in its run `run_id`, register its ONNX model (with the
    kiln model file it was exported from) and let the gate move finetune.registered_model's aliases."""
    logits = onnx_logits(onnx_file)
    predicted = predict_batches(logits, to_float(x_test)).argmax(1)
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_metrics({"test_accuracy": float(np.mean(predicted == y_test)),
                            "test_macro_f1": float(f1_score(y_test, predicted, average="macro"))})
        mlflow.log_dict(predictions_record(x_test, y_test, predicted), PREDICTIONS)
        tags = {**tags, "kiln.finetune_method": params.finetune.select, "kiln.finetune_run_id": parent_id}
        return register_onnx(onnx_file, model_file, logits, to_float(x_test[:2]), classes,
                             params.finetune.registered_model, tags, Gate.from_params(params))
