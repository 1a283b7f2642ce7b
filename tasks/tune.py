"""Stage `tune`: Ray Tune search (grid, random or TPE; FIFO, ASHA or PBT) over params' search space; every trial is an
MLflow child run of the stage's `tune` run. Writes the best hyperparameters (--best-config) and the trials table,
best-so-far curve and their figures (--reports). The Ray Tune experiment lives under train.storage_path, named by
its settings and data, so an interrupted stage resumes: finished trials are kept, unfinished ones continue from
their last checkpoint, and the stale MLflow runs are marked KILLED.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from ray import tune

from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.files import write_json
from kiln.core.models import model_spec
from kiln.core.multitask import load_tasks
from kiln.core.params import TUNABLE_TRAIN_KEYS, Params
from kiln.core.prepared import stratified_head
from kiln.core.stage import open_stage, reports_together, stage_run
from kiln.train.recipe import make_recipe
from kiln.tune import search
from kiln.tune.experiment import close_stale_runs, experiment_name, make_trainable, make_tuner
from kiln.tune.report import REPORTS, progress_curve, summary, trial_table, write_reports

FIXED_KEYS = (*TUNABLE_TRAIN_KEYS, "seed")  # train values every trial starts from; the search space overrides some


def run(params: Params, data: Path, best_config: Path, reports: Path) -> dict[str, Any]:
    """Search `params.tune.search_space` and write the best hyperparameters; returns the stage metrics."""
    settings, train = params.tune, params.train
    tasks = load_tasks(params, data)
    keep = stratified_head(tasks.y_train, settings.max_train_samples, settings.seed)  # every task's classes
    arrays = tasks.arrays(keep)
    batch = settings.search_space.get("batch_size")
    largest_batch = train.batch_size if batch is None else max(batch.values or [batch.high])
    if largest_batch > len(keep):
        raise InputError(f"tune: batch_size up to {largest_batch} exceeds the {len(keep)} images trials train on")
    spec = model_spec(train.model, tasks.manifests[params.prepare.dataset], train.dropout,
                      tasks.manifests)  # a model that cannot take the data fails now
    recipe = make_recipe(train, params.prepare.dataset)
    space = {**{key: getattr(train, key) for key in FIXED_KEYS}, **search.param_space(settings)}
    name, storage = experiment_name(params, data), ray_cluster.storage_uri(train.storage_path)

    uri = open_stage(params, (settings.cpus_per_trial * settings.workers_per_trial, "a tune trial"))
    parent_id, ended = close_stale_runs(params.tracking.experiment, name)
    resume = parent_id is not None and tune.Tuner.can_restore(f"{storage}/{name}")
    with stage_run("tune", params, data, parent_id if resume else None, {"kiln.tune_experiment": name}) as parent:
        if not resume:
            mlflow.log_params({f"tune.{k}": v for k, v in settings.model_dump(exclude={"search_space"}).items()})
            mlflow.log_dict(settings.model_dump(mode="json")["search_space"], "search_space.json")
        trainable = make_trainable(settings, arrays, spec, recipe, storage)
        results = make_tuner(params, trainable, space, storage, name, uri, parent.info.run_id,
                             ended if resume else None).fit()
        trials = trial_table(results, settings)
        if (trials.state == "failed").all():
            raise RuntimeError(f"all {len(trials)} tune trials failed; first error: {results.errors[:1]}")
        best = results.get_best_result(scope="last", filter_nan_and_inf=True)
        hyperparameters = {key: best.config[key] for key in settings.search_space}
        curve = progress_curve(results, settings)
        metrics = summary(trials, curve, float(best.metrics[settings.metric]), settings)
        mlflow.log_metrics(metrics)
        mlflow.log_params({f"best.{k}": v for k, v in hyperparameters.items()})
        with reports_together(reports, REPORTS) as out:
            write_reports(out, trials, curve, metrics, settings)
            for key in ("scatter", "curve_plot"):
                mlflow.log_artifact(str(out[key]))
        mlflow.log_table(trials, "trials.json")
    write_json(best_config, {"hyperparameters": hyperparameters, "metric": settings.metric,
                             "value": metrics[f"best_{settings.metric}"], "mlflow_run_id": parent.info.run_id})
    print(f"tune: best {settings.metric}={metrics[f'best_{settings.metric}']:.4f} with {hyperparameters} "
          f"({metrics['trials']} trials, {metrics['trial_epochs']} trial-epochs, "
          f"{metrics['stopped_early_trials']} stopped early, {metrics['failed_trials']} failed)")
    return metrics
