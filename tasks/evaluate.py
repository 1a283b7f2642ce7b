"""Stage `evaluate`: test-set metrics of the deployable ONNX model (compress picks it), MLflow logging, registration."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import onnx
import torch
from mlflow import MlflowClient
from mlflow.models import infer_signature

from kiln.config import Params
from kiln.data import load_split, read_manifest, to_float
from kiln.io import atomic_path, write_json
from kiln.metrics import classification_metrics, confusion
from kiln.models import load_trained_model
from kiln.onnx_tools import predict_onnx
from kiln.plots import save_confusion_matrix
from kiln.registry import PREDICTIONS, Decision, Gate, predictions_record, promote
from kiln.tracking import lineage_tags, use_experiment


def run(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    model_path: Path = Path("models/model.pt"),
    onnx_path: Path = Path("models/deployable.onnx"),
    report_dir: Path = Path("reports/evaluate"),
) -> tuple[dict[str, float], Decision]:
    """Evaluate on the test split, log and register the deployable model, apply the promotion gate."""
    manifest = read_manifest(prepared_dir)
    classes, num_classes = manifest["classes"], len(manifest["classes"])
    x_test, y_test = load_split(prepared_dir, "test")
    images = to_float(x_test)
    predicted = predict_onnx(onnx_path, images).argmax(1)
    fp32_model, saved = load_trained_model(str(model_path))
    with torch.no_grad():
        fp32_predicted = fp32_model(torch.from_numpy(images)).argmax(1).numpy()
    deployable = classification_metrics(y_test, predicted, num_classes)
    metrics = {f"test_{key}": value for key, value in deployable.items()}
    metrics["fp32_test_accuracy"] = classification_metrics(y_test, fp32_predicted, num_classes)["accuracy"]

    plot = report_dir / "confusion_matrix.png"
    save_confusion_matrix(confusion(y_test, predicted, num_classes), classes, plot, "deployable model, test split")
    with atomic_path(report_dir / "predictions.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[a], classes[p]) for a, p in zip(y_test, predicted, strict=True))

    use_experiment(params.evaluate.experiment)
    lineage = {**lineage_tags(params, prepared_dir), "kiln.train_run_id": saved["mlflow_run_id"],
               "kiln.tune_run_id": saved["tune_run_id"]}
    example = images[:1]
    with mlflow.start_run(run_name="evaluate", tags={"kiln.stage": "evaluate", **lineage}):
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(plot))
        mlflow.log_dict(predictions_record(x_test, y_test, predicted), PREDICTIONS)
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)), name="model", input_example=example, metadata={"classes": classes},
            signature=infer_signature(example, predict_onnx(onnx_path, example)),
        )
        version = mlflow.register_model(info.model_uri, params.evaluate.registered_model, tags=lineage)
        gate = Gate(params.evaluate.gate_metric, params.evaluate.gate_margin, params.evaluate.gate_alpha)
        decision = promote(MlflowClient(), params.evaluate.registered_model, version.version, gate)
        mlflow.log_dict(decision.as_dict(), "promotion.json")
        mlflow.set_tags({"kiln.promoted": str(decision.promoted).lower(), "kiln.promotion_reason": decision.reason})
        mlflow.log_metrics({f"gate_{key}": getattr(decision, key) for key in ("delta", "b", "c", "p_value")
                            if getattr(decision, key) is not None})
    write_json(report_dir / "metrics.json", metrics)
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    verdict += f": {decision.reason}"
    print(f"evaluate: test_accuracy={metrics['test_accuracy']:.4f} macro_f1={metrics['test_macro_f1']:.4f}; "
          f"registered {params.evaluate.registered_model} v{decision.version} as challenger, {verdict}")
    return metrics, decision

