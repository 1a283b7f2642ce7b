"""What a Ray Tune trial runs (a single-process training loop, or a Ray Train TorchTrainer it drives) and how its
end is recorded in MLflow."""

from __future__ import annotations

import tempfile
from typing import Any

import ray
from mlflow import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from torch.utils.data import DataLoader

from kiln.core.models import build_model
from kiln.core.params import EarlyStoppingParams
from kiln.train.checkpoint import load, restore, save, training_state
from kiln.train.distributed import train_config, train_worker
from kiln.train.job import RayJob, fit
from kiln.train.loop import VAL_BATCH, Hooks, Progress, run_epochs
from kiln.train.multitask import equal_shares, multitask_hooks, validation_sets
from kiln.train.recipe import (
    Recipe,
    apply_hyperparameters,
    make_loader,
    make_optimizer,
    make_scheduler,
    seed_everything,
    to_dataset,
    with_values,
)


def single_process_trial(config: dict[str, Any], data: dict[str, Any], spec: dict[str, Any], recipe: Recipe,
                         epochs: int) -> None:
    """The one loop (world size 1) in this trial's process, reporting validation metrics and a checkpoint every
    epoch. A trial restored from a checkpoint (a resumed experiment, or a PBT exploit) keeps the optimiser's momentum
    buffers but takes this trial's hyperparameters, which PBT may have perturbed."""
    recipe = with_values(recipe, config)
    seed_everything(config["seed"])  # the initial weights: a function of the seed, not of what this process ran before
    model = build_model(**{**spec, "dropout": config["dropout"]})
    optimizer = make_optimizer(model, recipe)
    batch, sampler = int(config["batch_size"]), equal_shares(data, config["seed"])
    train_loader = (make_loader(data["x_train"], data["y_train"], batch, True, config["seed"]) if sampler is None else
                    DataLoader(to_dataset(data["x_train"], data["y_train"]), batch_size=batch, sampler=sampler))
    val_loaders = [make_loader(x, y, VAL_BATCH, False, config["seed"]) for x, y in validation_sets(data)]
    scheduler = make_scheduler(optimizer, recipe, epochs, len(train_loader))
    progress = Progress()
    if (checkpoint := tune.get_checkpoint()) is not None:
        progress = restore(load(checkpoint), model, optimizer, scheduler)
        apply_hyperparameters(optimizer, recipe)
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, float], progress: Progress) -> None:
        with tempfile.TemporaryDirectory() as folder:
            state = training_state(model, optimizer, scheduler, None, progress)
            tune.report({**metrics, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(save(folder, state)))

    layout = data["layout"]  # a multi-task run's tasks (kiln.core.multitask.TaskLayout), or None
    extra = multitask_hooks(layout, val_loaders, recipe.label_smoothing) if layout else {}
    run_epochs(model, optimizer, train_loader, epochs, recipe, val_loader=val_loaders[0], scheduler=scheduler,
               progress=progress, seed=config["seed"], hooks=Hooks(on_epoch=report, **extra))


def distributed_trial(config: dict[str, Any], data: dict[str, Any], spec: dict[str, Any], recipe: Recipe,
                      epochs: int, workers: int, cpus_per_worker: int, storage_path: str) -> None:
    """Train this trial's config on a Ray Train job of `workers` workers; their rank-0 reports become the trial's
    results."""
    context = tune.get_context()
    job = RayJob(storage_path, f"{context.get_experiment_name()}-{context.get_trial_id()}", workers, cpus_per_worker,
                 use_gpu=False, max_failures=0)
    fit(job, train_worker, train_config(spec, recipe, config, epochs, EarlyStoppingParams()), data,
        callbacks=[TuneReportCallback()])


def trial_state(failed: bool, epochs_reached: int, epochs: int) -> str:
    """How a trial ended: failed, stopped_early (by the scheduler, before `epochs`) or completed."""
    return "failed" if failed else "stopped_early" if epochs_reached < epochs else "completed"


class TrialTracker(MLflowLoggerCallback):
    """Ray's MLflow callback (a child run per trial), also tagging how each trial ended as `kiln.trial_state`."""

    def __init__(self, epochs: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epochs = epochs

    def log_trial_start(self, trial: Any) -> None:
        """Params once; when PBT restarts a trial with perturbed hyperparameters, log them as `config.*` metrics."""
        if trial not in self._trial_runs:
            super().log_trial_start(trial)
            return
        step = (trial.last_result or {}).get("training_iteration", 0)
        numbers = {f"config.{k}": float(v) for k, v in trial.config.items() if isinstance(v, int | float)}
        self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numbers, step=step)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A trial restarting after its process died keeps its run, tagged with how many times it restarted."""
        MlflowClient(self.tracking_uri).set_tag(self._trial_runs[trial], "kiln.trial_restarts", str(trial.num_failures))

    def log_trial_end(self, trial: Any, failed: bool = False) -> None:
        state = trial_state(failed, (trial.last_result or {}).get("training_iteration", 0), self.epochs)
        MlflowClient(self.tracking_uri).set_tag(self._trial_runs[trial], "kiln.trial_state", state)
        super().log_trial_end(trial, failed)
