"""One tune stage run as a Ray Tune experiment: its stable name (so an interrupted run resumes), the trainable, the
Tuner (new or restored), a one-line progress report per finished trial, and the MLflow runs of an interrupted run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from ray import tune

from kiln.core.params import Params, TuneParams
from kiln.core.tracking import data_hash
from kiln.train.recipe import Recipe
from kiln.tune import search
from kiln.tune.trials import TrialTracker, distributed_trial, single_process_trial, trial_state

TRIAL_KEYS = {"model", "tasks", "task_sampling", "dropout", "batch_size", "optimizer", "lr", "momentum",
              "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "adversarial", "augmentation",
              "amp", "channels_last", "seed"}  # train keys a trial uses: dvc.yaml's tune params (test_contract)


def experiment_name(params: Params, data: Path) -> str:
    """Stable for the same tune settings, train keys and data, so an interrupted run resumes under it."""
    identity = {"tune": params.tune.model_dump(mode="json"), "data": data_hash(data),
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


class TrialLines(tune.Callback):
    """One line per finished trial (instead of Ray's boxed status tables): its values, metric and how it ended."""

    def __init__(self, settings: TuneParams, max_failures: int) -> None:
        self.settings, self.max_failures, self.finished = settings, max_failures, 0

    def _line(self, trial: Any, failed: bool) -> None:
        self.finished += 1
        result = trial.last_result or {}
        epochs = result.get("training_iteration", 0)
        values = " ".join(f"{key}={trial.config[key]:.4g}" for key in self.settings.search_space)
        metric = result.get(self.settings.metric)
        scored = f"{self.settings.metric}={metric:.4f}" if metric is not None else "no result"
        state = trial_state(failed, epochs, self.settings.epochs)
        print(f"tune: trial {self.finished}/{search.trial_count(self.settings)} {state} after {epochs} epochs: "
              f"{values} -> {scored}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trial, failed=True)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        print(f"tune: a trial's process died after {epochs} epochs ({trial.num_failures} of "
              f"{self.max_failures} failures allowed); it restarts from its last checkpoint", flush=True)


def close_stale_runs(experiment: str, tune_experiment: str) -> tuple[str | None, int]:
    """Mark runs an earlier tune stage of this experiment left RUNNING as KILLED; returns its latest parent run's id,
    if any, and how many of its trials ended."""
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], f"tags.`kiln.tune_experiment` = '{tune_experiment}'",
                              order_by=["attributes.start_time DESC"], max_results=10_000)
    for stale in (r for r in runs if r.info.status == "RUNNING"):
        client.set_terminated(stale.info.run_id, "KILLED")
    parents = [r.info.run_id for r in runs if r.data.tags.get("kiln.stage") == "tune"]
    return (parents[0] if parents else None), sum("kiln.trial_state" in r.data.tags for r in runs)


def make_tuner(params: Params, trainable: Any, space: dict[str, Any], storage: str, name: str, tracking_uri: str,
               parent_run_id: str, ended: int | None) -> tune.Tuner:
    """A Tuner for the tune section's search and scheduler, whose trials are child runs of `parent_run_id` and print
    one line each when they end; or, given the number of trials an earlier run of the experiment `ended`, that one
    restored: its ended trials are reused and the others continue."""
    if ended is not None:
        print(f"tune: reusing {ended} ended trials of {storage}/{name}; the other trials continue", flush=True)
        return tune.Tuner.restore(f"{storage}/{name}", trainable, resume_errored=True)
    settings = params.tune
    # Ray's new output engine prints a configuration box whatever `verbose` says; the legacy one is silent at
    # verbose 0, and TrialLines reports each trial instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray Tune warns whenever handling a result takes over 0.5 s, routine on a busy 2-core machine: noise in the log.
    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    tracker = TrialTracker(settings.epochs, tracking_uri=tracking_uri, experiment_name=params.tracking.experiment,
                           tags={"mlflow.parentRunId": parent_run_id, "kiln.stage": "tune-trial",
                                 "kiln.tune_experiment": name})
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
                                    search_alg=search.search_algorithm(settings, settings.seed),
                                    scheduler=search.scheduler(settings, settings.seed)),
        # A trial whose process dies (a lost node, a killed worker) restarts from its last epoch checkpoint, in the
        # same MLflow run, as often as a train stage's worker group may.
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=params.train.max_failures),
                                  callbacks=[tracker, TrialLines(settings, params.train.max_failures)]),
    )
