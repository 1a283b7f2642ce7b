"""Stage `tune`: Ray Tune random search; every trial is an MLflow child run; writes the best config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.search.basic_variant import BasicVariantGenerator

from kiln import cluster
from kiln.config import Params, SearchDimension
from kiln.data import load_split, read_manifest, stratified_head
from kiln.io import write_json
from kiln.models import build_model
from kiln.tracking import lineage_tags, use_experiment
from kiln.training import evaluate, make_loader, make_optimizer, seed_everything, train_epoch


def to_tune_domain(dimension: SearchDimension) -> Any:
    """params.yaml search dimension -> Ray Tune sampling domain."""
    if dimension.type == "choice":
        return tune.choice(dimension.values)
    sampler = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dimension.type]
    if dimension.type == "randint":
        return sampler(int(dimension.low), int(dimension.high))
    return sampler(dimension.low, dimension.high)


def run_trial(config: dict[str, Any], data: dict[str, np.ndarray], spec: dict[str, Any], epochs: int) -> None:
    """One trial: a short single-process training that reports validation metrics every epoch."""
    seed_everything(config["seed"])
    model = build_model(**spec)
    optimizer = make_optimizer(model, config["lr"], config["momentum"], config["weight_decay"])
    train_loader = make_loader(data["x_train"], data["y_train"], int(config["batch_size"]), True, config["seed"])
    val_loader = make_loader(data["x_val"], data["y_val"], 512, False, config["seed"])
    for epoch in range(1, epochs + 1):
        fit = train_epoch(model, train_loader, optimizer)
        val = evaluate(model, val_loader)
        tune.report({"epoch": epoch, "train_loss": fit.loss, "val_loss": val.loss, "val_accuracy": val.accuracy})


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
    channels, side, _ = manifest["image_shape"]
    spec = dict(name=train.model, in_channels=channels, num_classes=len(manifest["classes"]), image_size=side,
                **manifest["normalization"])
    fixed = {key: getattr(train, key) for key in ("lr", "momentum", "weight_decay", "batch_size", "seed")}
    space = {**fixed, **{key: to_tune_domain(dim) for key, dim in settings.search_space.items()}}

    uri = use_experiment(params.evaluate.experiment)
    cluster.connect()
    cluster.require_cpus(settings.cpus_per_trial, "tune.cpus_per_trial")
    with mlflow.start_run(run_name="tune", tags={"kiln.stage": "tune", **lineage_tags(params, prepared_dir)}) as parent:
        mlflow.log_params({f"tune.{k}": v for k, v in settings.model_dump(exclude={"search_space"}).items()})
        mlflow.log_dict(settings.model_dump(mode="json")["search_space"], "search_space.json")
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, data=data, spec=spec, epochs=settings.epochs),
            {"cpu": settings.cpus_per_trial},
        )
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                search_alg=BasicVariantGenerator(random_state=params.prepare.seed),
            ),
            run_config=tune.RunConfig(
                name=f"tune-{parent.info.run_id}",
                storage_path=str(storage_path.resolve()),
                callbacks=[MLflowLoggerCallback(
                    tracking_uri=uri, experiment_name=params.evaluate.experiment,
                    tags={"mlflow.parentRunId": parent.info.run_id, "kiln.stage": "tune-trial"},
                )],
            ),
        )
        results = tuner.fit()
        finished = [r for r in results if r.error is None and settings.metric in (r.metrics or {})]
        if not finished:
            raise RuntimeError(f"all {len(results)} tune trials failed; first error: {results.errors[:1]}")
        best = results.get_best_result()
        hyperparameters = {key: best.config[key] for key in settings.search_space}
        metrics = {
            f"best_{settings.metric}": float(best.metrics[settings.metric]),
            "trials": len(results),
            "failed_trials": len(results.errors),
        }
        mlflow.log_metrics(metrics)
        mlflow.log_params({f"best.{k}": v for k, v in hyperparameters.items()})
    write_json(best_config_path, {"hyperparameters": hyperparameters, "metric": settings.metric,
                                  "value": metrics[f"best_{settings.metric}"], "mlflow_run_id": parent.info.run_id})
    write_json(report_dir / "metrics.json", metrics)
    print(f"tune: best {settings.metric}={metrics[f'best_{settings.metric}']:.4f} with {hyperparameters}")
    return metrics

