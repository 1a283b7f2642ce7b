"""Stage `train`: distributed training with Ray Train on the tuned hyperparameters; writes models/model.pt."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import mlflow
import ray

from kiln import cluster
from kiln.config import Params
from kiln.data import load_split, read_manifest
from kiln.distributed import fit
from kiln.errors import InputError
from kiln.io import atomic_path, read_json, write_json
from kiln.models import build_model, save_trained_model
from kiln.plots import save_learning_curves
from kiln.tracking import lineage_tags, use_experiment


def resolve_hyperparameters(params: Params, best_config_path: Path) -> dict[str, Any]:
    """The train section's optimiser keys, replaced by the tuned ones when `train.use_tuned` is set."""
    chosen = {key: getattr(params.train, key) for key in ("lr", "momentum", "weight_decay", "batch_size")}
    if params.train.use_tuned:
        if not best_config_path.is_file():
            raise FileNotFoundError(f"{best_config_path}: no tuned config; run the tune stage or set train.use_tuned")
        chosen.update(read_json(best_config_path)["hyperparameters"])
    return chosen


def run(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    best_config_path: Path = Path("models/best_config.json"),
    model_path: Path = Path("models/model.pt"),
    report_dir: Path = Path("reports/train"),
    storage_path: Path = Path("ray_results"),
) -> dict[str, float]:
    """Train the final model; returns the final epoch's metrics."""
    settings = params.train
    hyperparameters = resolve_hyperparameters(params, best_config_path)
    manifest = read_manifest(prepared_dir)
    x_train, y_train = load_split(prepared_dir, "train")
    if hyperparameters["batch_size"] > len(x_train):
        raise InputError(f"train.batch_size={hyperparameters['batch_size']} exceeds the {len(x_train)} training images")
    x_val, y_val = load_split(prepared_dir, "val")
    channels, side, _ = manifest["image_shape"]
    spec = dict(name=settings.model, in_channels=channels, num_classes=len(manifest["classes"]), image_size=side,
                **manifest["normalization"])
    build_model(**spec)  # a model that cannot take this data fails here, before Ray starts

    use_experiment(params.evaluate.experiment)
    cluster.connect()
    cluster.require_cpus(settings.num_workers, "train.num_workers")
    tune_run = read_json(best_config_path)["mlflow_run_id"] if settings.use_tuned else ""
    with mlflow.start_run(run_name="train", tags={"kiln.stage": "train", "kiln.tune_run_id": tune_run,
                                                 **lineage_tags(params, prepared_dir)}) as run:
        mlflow.log_params({**settings.model_dump(), **hyperparameters})
        config = {
            "data": ray.put({"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}),
            "spec": spec, "hyperparameters": hyperparameters, "epochs": settings.epochs, "seed": settings.seed,
            "tracking_uri": mlflow.get_tracking_uri(), "mlflow_run_id": run.info.run_id,
        }
        state = fit(config, settings.num_workers, settings.use_gpu, storage_path, f"train-{run.info.run_id}",
                    settings.max_failures)
        history = state["history"]
        model = build_model(**spec)
        model.load_state_dict(state["model"])
        final = {key: float(value) for key, value in history[-1].items() if key != "epoch"}
        final["worker_nodes"] = len(set(state["worker_nodes"]))
        mlflow.log_metric("worker_nodes", final["worker_nodes"])
        curves = report_dir / "learning_curves.png"
        save_learning_curves(history, curves)
        mlflow.log_artifact(str(curves))
    with atomic_path(model_path) as tmp:
        save_trained_model(str(tmp), model, spec, {"mlflow_run_id": run.info.run_id, "tune_run_id": tune_run,
                                                   "hyperparameters": hyperparameters})
    with atomic_path(report_dir / "history.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_json(report_dir / "metrics.json", final)
    print(f"train: final val_accuracy={final['val_accuracy']:.4f} after {settings.epochs} epochs -> {model_path}")
    return final

