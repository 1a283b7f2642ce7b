"""Stage `tune`: Ray Tune search (grid, random or TPE; FIFO, ASHA or PBT); every trial is an MLflow child run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from ray import tune

from kiln import cluster, search
from kiln.config import TUNABLE_TRAIN_KEYS, Params, TuneParams
from kiln.data import load_split, read_manifest, stratified_head
from kiln.errors import InputError
from kiln.io import atomic_path, write_json
from kiln.models import model_spec
from kiln.plots import save_best_so_far, save_hyperparameter_scatter
from kiln.tracking import close_stale_runs, data_hash, lineage_tags, use_experiment
from kiln.training import Recipe, make_recipe
from kiln.trials import TrialTracker, distributed_trial, single_process_trial, trial_state

FIXED_KEYS = (*TUNABLE_TRAIN_KEYS, "seed")
TRIAL_KEYS = {"model", "dropout", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
              "warmup_epochs", "label_smoothing", "adversarial", "augmentation", "seed"}  # what a trial depends on


def experiment_name(params: Params, prepared_dir: Path) -> str:
    """Stable for the same tune settings, fixed train keys and data: an interrupted run resumes under it."""
    identity = {"tune": params.tune.model_dump(mode="json"), "data": data_hash(prepared_dir),
                "train": params.train.model_dump(mode="json", include=TRIAL_KEYS)}
    return "tune-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def make_trainable(settings: TuneParams, data: dict[str, np.ndarray], spec: dict[str, Any], recipe: Recipe,
                   storage: str) -> Any:
    """The trial function with its data and resources: a plain process, or a driver of a multi-worker TorchTrainer."""
    if settings.workers_per_trial == 1:
        trainable = tune.with_parameters(single_process_trial, data=data, spec=spec, recipe=recipe,
                                         epochs=settings.epochs)
        return tune.with_resources(trainable, {"cpu": settings.cpus_per_trial})
    trainable = tune.with_parameters(distributed_trial, data=data, spec=spec, recipe=recipe, epochs=settings.epochs,
                                     workers=settings.workers_per_trial, cpus_per_worker=settings.cpus_per_trial,
                                     storage_path=storage)
    return tune.with_resources(trainable, {"cpu": 0, "memory": 1})  # the driver only waits; its workers hold the CPUs


def trial_table(results: tune.ResultGrid, settings: TuneParams) -> pd.DataFrame:
    """One row per trial: its hyperparameters, final metric, epochs it trained, where it ran and how it ended."""
    rows = []
    for result in results:
        metrics, history = result.metrics or {}, result.metrics_dataframe
        epochs = 0 if history is None else len(history)  # trained here; a PBT clone starts from another's epoch
        state = trial_state(bool(result.error), metrics.get("training_iteration", 0), settings.epochs)
        rows.append({"trial_id": metrics.get("trial_id", Path(result.path).name), "state": state, "epochs": epochs,
                     **{key: result.config[key] for key in settings.search_space},
                     settings.metric: metrics.get(settings.metric, float("nan")),
                     "node_id": metrics.get("node_id", "")})
    ascending = settings.mode == "min"
    return pd.DataFrame(rows).sort_values(settings.metric, ascending=ascending, na_position="last")


def progress_curve(results: tune.ResultGrid, settings: TuneParams) -> pd.DataFrame:
    """Best metric so far against trial-epochs spent, all trials' epochs in the order they finished."""
    frames = [r.metrics_dataframe for r in results if r.metrics_dataframe is not None]
    epochs = pd.concat(frames).sort_values(["timestamp", "time_total_s"])[[settings.metric]].reset_index(drop=True)
    best = epochs[settings.metric].cummax() if settings.mode == "max" else epochs[settings.metric].cummin()
    return pd.DataFrame({"trial_epochs": np.arange(1, len(epochs) + 1), f"best_{settings.metric}": best})


def run(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    best_config_path: Path = Path("models/best_config.json"),
    report_dir: Path = Path("reports/tune"),
    storage_path: Path = Path("ray_results"),
) -> dict[str, Any]:
    """Search `params.tune.search_space` and write the best hyperparameters; returns the stage metrics."""
    settings, train = params.tune, params.train
    manifest = read_manifest(prepared_dir)
    x_train, y_train = load_split(prepared_dir, "train")
    keep = stratified_head(y_train, settings.max_train_samples, params.prepare.seed)
    x_val, y_val = load_split(prepared_dir, "val")
    data = {"x_train": x_train[keep], "y_train": y_train[keep], "x_val": x_val, "y_val": y_val}
    batch = settings.search_space.get("batch_size")
    largest_batch = train.batch_size if batch is None else max(batch.values or [batch.high])
    if largest_batch > len(keep):
        raise InputError(f"tune: batch_size up to {largest_batch} exceeds the {len(keep)} images trials train on")
    spec = model_spec(train.model, manifest, train.dropout)  # a model that cannot take this data fails before Ray
    recipe = make_recipe(train, params.prepare.dataset)
    space = {**{key: getattr(train, key) for key in FIXED_KEYS}, **search.param_space(settings)}
    name = experiment_name(params, prepared_dir)
    experiment_path = (storage_path / name).resolve()

    uri = use_experiment(params.evaluate.experiment)
    cluster.connect()
    cluster.require_cpus(settings.cpus_per_trial * settings.workers_per_trial, "a tune trial")
    parent_id = close_stale_runs(params.evaluate.experiment, name)
    resuming = parent_id is not None and tune.Tuner.can_restore(str(experiment_path))
    tags = {"kiln.stage": "tune", "kiln.tune_experiment": name, **lineage_tags(params, prepared_dir)}
    opened = dict(run_id=parent_id) if resuming else dict(run_name="tune", tags=tags)
    with mlflow.start_run(**opened) as parent:
        trainable = make_trainable(settings, data, spec, recipe, str(storage_path.resolve()))
        if resuming:
            print(f"tune: resuming interrupted experiment {experiment_path}")
            tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
        else:
            mlflow.log_params({f"tune.{k}": v for k, v in settings.model_dump(exclude={"search_space"}).items()})
            mlflow.log_dict(settings.model_dump(mode="json")["search_space"], "search_space.json")
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                    search_alg=search.search_algorithm(settings, params.prepare.seed),
                    scheduler=search.scheduler(settings, params.prepare.seed),
                ),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(storage_path.resolve()),
                    verbose=1,  # a status table now and then, not every trial's every result
                    callbacks=[TrialTracker(settings.epochs, tracking_uri=uri,
                                            experiment_name=params.evaluate.experiment,
                                            tags={"mlflow.parentRunId": parent.info.run_id, "kiln.stage": "tune-trial",
                                                  "kiln.tune_experiment": name})],
                ),
            )
        results = tuner.fit()
        trials = trial_table(results, settings)
        finished = trials[trials.state != "failed"]
        if finished.empty:
            raise RuntimeError(f"all {len(trials)} tune trials failed; first error: {results.errors[:1]}")
        best = results.get_best_result(scope="last", filter_nan_and_inf=True)
        hyperparameters = {key: best.config[key] for key in settings.search_space}
        curve = progress_curve(results, settings)
        metrics = {
            f"best_{settings.metric}": float(best.metrics[settings.metric]),
            "trials": len(trials), "failed_trials": int((trials.state == "failed").sum()),
            "stopped_early_trials": int((trials.state == "stopped_early").sum()), "trial_epochs": len(curve),
            "nodes": int(finished.node_id.replace("", np.nan).nunique()),
        }
        mlflow.log_metrics(metrics)
        mlflow.log_params({f"best.{k}": v for k, v in hyperparameters.items()})
        write_reports(report_dir, trials, curve, settings)
        for plot in ("hyperparameters.png", "best_so_far.png"):
            mlflow.log_artifact(str(report_dir / plot))
        mlflow.log_table(trials, "trials.json")
    write_json(best_config_path, {"hyperparameters": hyperparameters, "metric": settings.metric,
                                  "value": metrics[f"best_{settings.metric}"], "mlflow_run_id": parent.info.run_id})
    write_json(report_dir / "metrics.json", metrics)
    print(f"tune: best {settings.metric}={metrics[f'best_{settings.metric}']:.4f} with {hyperparameters} "
          f"({metrics['trials']} trials, {metrics['trial_epochs']} trial-epochs, "
          f"{metrics['stopped_early_trials']} stopped early, {metrics['failed_trials']} failed)")
    return metrics


def write_reports(report_dir: Path, trials: pd.DataFrame, curve: pd.DataFrame, settings: TuneParams) -> None:
    """The trials table (DVC metrics + CSV for plots), best-so-far curve, and their PNG plots."""
    records = json.loads(trials.to_json(orient="records", double_precision=15))
    write_json(report_dir / "trials.json", {record.pop("trial_id"): record for record in records})
    for frame, name in ((trials, "trials.csv"), (curve, "best_so_far.csv")):
        with atomic_path(report_dir / name) as tmp:
            frame.to_csv(tmp, index=False)
    log_scale = {key for key, dim in settings.search_space.items() if "log" in dim.type}
    save_hyperparameter_scatter(trials, list(settings.search_space), settings.metric, log_scale,
                                report_dir / "hyperparameters.png")
    save_best_so_far(curve, settings.metric, report_dir / "best_so_far.png")
