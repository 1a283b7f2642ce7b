"""Stage `train`: data-parallel training with Ray Train on the tuned hyperparameters (--best-config). Writes the model
(--model: weights and the spec to rebuild it) and the history, metrics and learning curves (--reports); a run
`train` in MLflow with per-epoch curves. A multi-task run (train.tasks) trains one trunk with a head per task on
batches from every task (kiln.train.multitask). The loop and its checkpoints: kiln.train; a stage killed mid-run and
started again on the same inputs resumes after its last finished epoch: kiln.train.resume."""

from __future__ import annotations

from pathlib import Path

import mlflow
import ray
from mlflow import MlflowClient

from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.files import atomic_path, read_json, sha256_file, write_csv, write_json
from kiln.core.models import build_model, initial_state, model_spec, save_trained_model
from kiln.core.multitask import load_tasks
from kiln.core.params import Params
from kiln.core.prepared import MANIFEST
from kiln.core.stage import open_stage, stage_run
from kiln.train.distributed import train_config, train_worker
from kiln.train.job import RayJob, fit
from kiln.train.plots import save_learning_curves
from kiln.train.recipe import make_recipe, tuned_hyperparameters
from kiln.train.resume import DRIVER_TAG, KEY_TAG, claim_run, forget, run_name, this_driver


def run(params: Params, data: Path, best_config: Path, model: Path, reports: Path) -> dict[str, float]:
    """Train the final model; returns the metrics of the epoch whose weights are kept."""
    settings = params.train
    hyperparameters = tuned_hyperparameters(settings, best_config)
    recipe = make_recipe(settings, params.prepare.dataset, hyperparameters)
    tasks = load_tasks(params, data)
    if hyperparameters["batch_size"] > len(tasks.y_train):
        raise InputError(f"train.batch_size={hyperparameters['batch_size']} exceeds the {len(tasks.y_train)} training "
                         "images")
    spec = model_spec(settings.model, tasks.manifests[params.prepare.dataset], hyperparameters["dropout"],
                      tasks.manifests)
    start = initial_state(settings.weights, spec)

    open_stage(params, (settings.num_workers * settings.cpus_per_worker, "train.num_workers x train.cpus_per_worker"))
    if settings.use_gpu:
        ray_cluster.require(settings.num_workers, "train.use_gpu (one GPU per worker)", "GPU")
    tune_run = read_json(best_config)["mlflow_run_id"] if settings.use_tuned else ""
    weights = settings.weights and sha256_file(settings.weights)
    name = run_name(train=settings.model_dump(), tuned=hyperparameters,
                    data=sha256_file(data / MANIFEST), spec=spec, weights=weights)
    storage = ray_cluster.storage_uri(settings.storage_path)
    experiment = mlflow.get_experiment_by_name(params.tracking.experiment).experiment_id
    resumed = claim_run(MlflowClient(), experiment, name)
    with stage_run("train", params, data, resumed,
                   {"kiln.tune_run_id": tune_run, KEY_TAG: name, DRIVER_TAG: this_driver()}) as run:
        mlflow.log_params({**settings.model_dump(exclude={"augmentation"}), **hyperparameters,
                           "augmentation": recipe.augment})
        config = train_config(spec, recipe, {**hyperparameters, "seed": settings.seed}, settings.epochs,
                              settings.early_stopping, None if start is None else ray.put(start))
        job = RayJob(storage, name, settings.num_workers, settings.cpus_per_worker, settings.use_gpu,
                     settings.max_failures, mlflow.get_tracking_uri(), {"train": run.info.run_id})
        state = fit(job, train_worker, config, tasks.arrays())
        history = state["history"]
        keep_best = settings.early_stopping.patience > 0
        kept = state["early_stopping"]["best_epoch"] if keep_best else history[-1]["epoch"]
        final = {**{key: float(value) for key, value in history[kept - 1].items()},
                 "worker_nodes": len(set(state["worker_nodes"]))}
        mlflow.log_metrics({"kept_epoch": kept, "worker_nodes": final["worker_nodes"]})
        trained = build_model(**spec)
        trained.load_state_dict(state["best_model"] if keep_best else state["model"])
        with atomic_path(reports / "learning_curves.png") as curves:
            save_learning_curves(history, curves)
            mlflow.log_artifact(str(curves))
    with atomic_path(model) as tmp:
        save_trained_model(str(tmp), trained, spec, {"mlflow_run_id": run.info.run_id, "tune_run_id": tune_run,
                                                     "hyperparameters": hyperparameters})
    write_csv(reports / "history.csv", history)
    write_json(reports / "metrics.json", final)
    forget(storage, name)
    print(f"train: val_accuracy={final['val_accuracy']:.4f} at epoch {kept} of {len(history)} run -> {model}")
    return final
