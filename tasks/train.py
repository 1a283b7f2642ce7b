"""Stage `train`: distributed training with Ray Train on the tuned hyperparameters; writes models/model.pt."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch

from kiln import cluster
from kiln.config import TUNABLE_TRAIN_KEYS, Params
from kiln.data import load_split, read_manifest
from kiln.distributed import fit
from kiln.errors import InputError
from kiln.io import atomic_path, read_json, write_json
from kiln.models import build_model, load_weights, model_spec, save_trained_model
from kiln.plots import save_learning_curves
from kiln.tracking import lineage_tags, use_experiment
from kiln.training import make_recipe

MODES = {"val_accuracy": "max", "val_loss": "min"}


def resolve_hyperparameters(params: Params, best_config_path: Path) -> dict[str, Any]:
    """The train section's tunable keys, replaced by the tuned ones when `train.use_tuned` is set."""
    chosen = {key: getattr(params.train, key) for key in TUNABLE_TRAIN_KEYS}
    if params.train.use_tuned:
        if not best_config_path.is_file():
            raise FileNotFoundError(f"{best_config_path}: no tuned config; run the tune stage or set train.use_tuned")
        chosen.update(read_json(best_config_path)["hyperparameters"])
    return chosen


def initial_state(params: Params, spec: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The model's starting weights from `train.weights` (local file), or None for a fresh initialisation."""
    if params.train.weights is None:
        return None
    model = build_model(**spec)
    try:
        skipped = load_weights(model, params.train.weights)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"train.weights: {exc}") from None
    print(f"train: weights from {params.train.weights}; freshly initialised: {', '.join(skipped) or 'nothing'}")
    return model.state_dict()


def storage_uri(storage_path: str) -> str:
    """A cloud URI as given; a local folder made absolute (Ray Train needs one)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def run(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    best_config_path: Path = Path("models/best_config.json"),
    model_path: Path = Path("models/model.pt"),
    report_dir: Path = Path("reports/train"),
) -> dict[str, float]:
    """Train the final model; returns the metrics of the epoch whose weights are kept."""
    settings = params.train
    hyperparameters = resolve_hyperparameters(params, best_config_path)
    manifest = read_manifest(prepared_dir)
    x_train, y_train = load_split(prepared_dir, "train")
    if hyperparameters["batch_size"] > len(x_train):
        raise InputError(f"train.batch_size={hyperparameters['batch_size']} exceeds the {len(x_train)} training images")
    x_val, y_val = load_split(prepared_dir, "val")
    spec = model_spec(settings.model, manifest, hyperparameters["dropout"])
    start = initial_state(params, spec)
    recipe = make_recipe(settings, params.prepare.dataset, hyperparameters)

    use_experiment(params.evaluate.experiment)
    cluster.connect()
    cluster.require_cpus(settings.num_workers * settings.cpus_per_worker, "train.num_workers x train.cpus_per_worker")
    tune_run = read_json(best_config_path)["mlflow_run_id"] if settings.use_tuned else ""
    with mlflow.start_run(run_name="train", tags={"kiln.stage": "train", "kiln.tune_run_id": tune_run,
                                                 **lineage_tags(params, prepared_dir)}) as run:
        mlflow.log_params({**settings.model_dump(exclude={"augmentation"}), **hyperparameters,
                           "augmentation": recipe.augment})
        config = {
            "data": ray.put({"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}),
            "initial_state": None if start is None else ray.put(start), "spec": spec, "recipe": recipe,
            "batch_size": int(hyperparameters["batch_size"]), "epochs": settings.epochs, "seed": settings.seed,
            "early_stopping": settings.early_stopping.model_dump() | {"mode": MODES[settings.early_stopping.metric]},
            "tracking_uri": mlflow.get_tracking_uri(), "mlflow_run_id": run.info.run_id,
        }
        state = fit(config, settings.num_workers, settings.cpus_per_worker, settings.use_gpu,
                    storage_uri(settings.storage_path), f"train-{run.info.run_id}", settings.max_failures)
        history = state["history"]
        keep_best = settings.early_stopping.patience > 0
        kept = state["early_stopping"]["best_epoch"] if keep_best else history[-1]["epoch"]
        model = build_model(**spec)
        model.load_state_dict(state["best_model"] if keep_best else state["model"])
        final = {key: float(value) for key, value in history[kept - 1].items()}
        final["worker_nodes"] = len(set(state["worker_nodes"]))
        mlflow.log_metrics({"kept_epoch": kept, "worker_nodes": final["worker_nodes"]})
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
    print(f"train: val_accuracy={final['val_accuracy']:.4f} at epoch {kept} of {len(history)} run -> {model_path}")
    return final
