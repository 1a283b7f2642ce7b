"""Stage `finetune`: adapt a registered model (finetune.base, an alias or version of tracking.registered_model) to the
target data (--data, finetune_data's) with every method of finetune.methods, compare them, and register the selected
one (finetune.select) as a version of finetune.registered_model, gated like evaluate's.

Its dep --base (evaluate's finetune_base.json: the version finetune.base named when evaluate last ran) changes when
evaluate moves that alias, so `dvc repro` fine-tunes again when `champion` moves; the stage itself resolves the
reference in the registry as it starts. Everything is checked (base, shapes, adapter targets, shots) before Ray
starts. MLflow: a parent run `finetune` (lineage tags naming the base version) with a child run per method (its
per-epoch curves, trainable parameters and fraction, adapter size, wall time, test accuracy); the selected method's
run holds the ONNX model that is registered, with the test predictions the gate pairs. Outputs: the merged model
(--model, a kiln model file that compress and evaluate take), its ONNX export (--onnx-model) and the comparison
(--reports)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from sklearn.metrics import f1_score

from kiln.compress.onnx_export import export_onnx
from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.files import atomic_path, write_json
from kiln.core.inference import accuracy, onnx_logits, predict_batches, torch_logits
from kiln.core.models import save_trained_model
from kiln.core.params import ADAPTERS, Params
from kiln.core.prepared import load_split, per_class, read_manifest, to_float
from kiln.core.tracking import lineage_tags, use_experiment
from kiln.evaluate.gate import Decision, Gate, predictions_record
from kiln.evaluate.publish import register_onnx
from kiln.evaluate.registry import PREDICTIONS, resolve_version
from kiln.finetune.base import Base, load_base
from kiln.finetune.methods import check_targets
from kiln.finetune.report import markdown, save_accuracy_plot
from kiln.finetune.training import Tuned, finetune
from kiln.train.job import RayJob

REPORTS = {"metrics": "metrics.json", "methods": "methods.json", "table": "methods.md", "curve": "methods.csv",
           "plot": "methods.png", "registration": "registration.json"}


def check_target(base: Base, manifest: dict, params: Params) -> None:
    """InputError naming the finetune.target key when the base cannot take the target's images."""
    channels, side, _ = manifest["image_shape"]
    spec = base.saved["spec"]
    if channels != spec["in_channels"]:
        raise InputError(f"finetune.target.dataset: {params.finetune.target.dataset} has {channels}-channel images "
                         f"but base {base.name} v{base.version} takes {spec['in_channels']} channels")
    if side != spec["image_size"]:
        raise InputError(f"finetune.target.image_side: the target's images are {side}x{side} but base {base.name} "
                         f"v{base.version} takes {spec['image_size']}x{spec['image_size']}; set image_side: "
                         f"{spec['image_size']}")


def few_shots(labels: np.ndarray, shots: int, seed: int, classes: list[str]) -> np.ndarray:
    """The training indices: `shots` per class (all when 0); InputError naming the key when a class has fewer."""
    if shots == 0:
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=len(classes))
    short = int(np.argmin(counts))
    if counts[short] < shots:
        raise InputError(f"finetune.shots_per_class: {shots} exceeds the {counts[short]} training images of class "
                         f"{classes[short]!r}")
    return per_class(labels, shots, seed)


def run(params: Params, base: Path, data: Path, model: Path, onnx_model: Path, reports: Path) -> dict[str, float]:
    """Fine-tune with every method, write the comparison and the selected model, register it; returns its metrics."""
    settings = params.finetune
    if not base.is_file():
        raise InputError(f"{base}: missing; run the evaluate stage first (dvc repro evaluate)")
    manifest = read_manifest(data)
    x_train, y_train = load_split(data, "train")
    shots = few_shots(y_train, settings.shots_per_class, settings.seed, manifest["classes"])
    x_val, y_val = load_split(data, "val")
    x_test, y_test = load_split(data, "test")
    use_experiment(params.tracking.experiment)
    name = params.tracking.registered_model
    origin = load_base(MlflowClient(), name, resolve_version(MlflowClient(), name, settings.base))
    check_target(origin, manifest, params)
    for method in (method for method in settings.methods if method in ADAPTERS):
        check_targets(origin.model, method, settings.adapters[method])
    ray_cluster.connect()
    ray_cluster.require(settings.num_workers * settings.cpus_per_worker,
                        "finetune.num_workers x finetune.cpus_per_worker")
    print(f"finetune: {origin.name} v{origin.version} ({settings.base}) -> {manifest['dataset']}, {len(shots)} "
          f"training images ({settings.shots_per_class or 'all'} per class), methods {', '.join(settings.methods)}")

    tags = {**lineage_tags(params, data), **origin.tags}
    num_classes = len(manifest["classes"])
    with mlflow.start_run(run_name="finetune", tags={**tags, "kiln.stage": "finetune"}) as parent:
        mlflow.log_params({key: value for key, value in settings.model_dump(mode="json").items()
                           if key not in ("target", "adapters", "lr")})
        runs = {}
        for method in settings.methods:
            with mlflow.start_run(run_name=method, nested=True, tags={**tags, "kiln.stage": "finetune-method",
                                                                     "kiln.finetune_method": method}) as child:
                mlflow.log_params({"method": method, "lr": settings.lr[method],
                                   **(settings.adapters[method].model_dump() if method in ADAPTERS else {})})
                runs[method] = child.info.run_id
        job = RayJob(ray_cluster.storage_uri(params.train.storage_path), f"finetune-{parent.info.run_id}",
                     settings.num_workers, settings.cpus_per_worker, False, params.train.max_failures,
                     mlflow.get_tracking_uri(), runs)
        tuned = finetune(origin.model, origin.saved["spec"], num_classes, settings,
                         {"x_train": x_train[shots], "y_train": y_train[shots], "x_val": x_val, "y_val": y_val}, job)
        rows = [method_row(method, result, x_test, y_test) for method, result in tuned.items()]
        for row in rows:
            with mlflow.start_run(run_id=runs[row["method"]], nested=True):
                mlflow.log_metrics({key: float(value) for key, value in row.items() if key != "method"})
        chosen = next(row for row in rows if row["method"] == settings.select)
        metrics = {"test_accuracy": chosen["test_accuracy"]}  # the rest is in methods.json
        with ExitStack() as stack:  # every output moves into place when the block exits without error
            out = {key: stack.enter_context(atomic_path(reports / name)) for key, name in REPORTS.items()}
            model_file, onnx_file = (stack.enter_context(atomic_path(path)) for path in (model, onnx_model))
            selected = tuned[settings.select].model
            save_trained_model(str(model_file), selected, {**origin.saved["spec"], "num_classes": num_classes},
                               {"mlflow_run_id": runs[settings.select], "tune_run_id": "",
                                "hyperparameters": {}, "base": origin.tags})
            export_onnx(selected, torch.from_numpy(to_float(x_test[:2])), onnx_file)
            write_json(out["methods"], {"selected": settings.select, "base": origin.tags, "methods": rows})
            out["table"].write_text(markdown(rows, settings.select))
            out["curve"].write_text("method,trainable_parameters,test_accuracy\n" + "".join(
                f"{row['method']},{row['trainable_parameters']},{row['test_accuracy']}\n" for row in rows))
            save_accuracy_plot(rows, out["plot"])
            write_json(out["metrics"], metrics)
            for key in ("methods", "table", "plot"):
                mlflow.log_artifact(str(out[key]))
            mlflow.log_metrics(metrics)
            decision = register(params, runs[settings.select], onnx_file, model_file, tags, parent.info.run_id,
                                x_test, y_test, manifest["classes"])
            write_json(out["registration"], {"registered_model": settings.registered_model, **decision.as_dict()})
    print(markdown(rows, settings.select), end="")
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    print(f"finetune: {settings.select} test_accuracy={chosen['test_accuracy']:.4f} with "
          f"{chosen['trainable_fraction']:.2%} of the weights trained; registered {settings.registered_model} "
          f"v{decision.version} from {origin.name} v{origin.version}, {verdict}: {decision.reason}")
    return metrics


def method_row(method: str, result: Tuned, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """One method's line of the comparison: test and final val accuracy, trainable parameters, costs."""
    return {"method": method, "test_accuracy": accuracy(torch_logits(result.model), to_float(x_test), y_test),
            "val_accuracy": result.history[-1]["val_accuracy"], "trainable_parameters": result.trainable_parameters,
            "trainable_fraction": result.trainable_parameters / result.parameters,
            "adapter_bytes": result.adapter_bytes, "wall_seconds": round(result.wall_seconds, 2)}


def register(params: Params, run_id: str, onnx_file: Path, model_file: Path, tags: dict[str, str], parent_id: str,
             x_test: np.ndarray, y_test: np.ndarray, classes: list[str]) -> Decision:
    """In the selected method's run: its test metrics and paired predictions from the ONNX model (what batch inference
    loads), then that model registered as a version of finetune.registered_model through evaluate's gate."""
    logits = onnx_logits(onnx_file)
    predicted = predict_batches(logits, to_float(x_test)).argmax(1)
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_metrics({"test_accuracy": float(np.mean(predicted == y_test)),
                            "test_macro_f1": float(f1_score(y_test, predicted, average="macro"))})
        mlflow.log_dict(predictions_record(x_test, y_test, predicted), PREDICTIONS)
        tags = {**tags, "kiln.finetune_method": params.finetune.select, "kiln.finetune_run_id": parent_id}
        return register_onnx(onnx_file, model_file, logits, to_float(x_test[:2]), classes,
                             params.finetune.registered_model, tags, Gate.from_params(params))
