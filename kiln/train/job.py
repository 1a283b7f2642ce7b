"""A Ray Train job (PyTorch DDP): where and how a fit runs (`RayJob`), the one worker entry every job goes through,
which sets up what all of them need (`WorkerContext`) before the job's own body runs, and the driver call (`fit`).
Train, compression's recovery training and fine-tuning are each a body."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import ray
import ray.train
import ray.train.torch
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from torch.utils.data import DataLoader, DistributedSampler

from kiln.core.errors import InputError
from kiln.train.checkpoint import load, save
from kiln.train.loop import VAL_BATCH
from kiln.train.multitask import equal_shares, validation_sets
from kiln.train.recipe import make_loader, to_dataset

Config = TypeVar("Config")
EpochLog = Callable[[dict[str, float], int], None]  # (metrics, step)


@dataclass(frozen=True)
class RayJob:
    """Where and how a Ray Train fit runs: its checkpoints (`storage_path`, a folder or a cloud URI, under `name`),
    its workers, how many worker deaths it survives, and the MLflow runs (by what is trained) its rank 0 logs each
    epoch into (none: no logging)."""

    storage_path: str
    name: str
    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    max_failures: int
    tracking_uri: str = ""
    mlflow_runs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerContext:
    """What every worker of a job has: its rank among `world`, the job's data and the latest checkpoint (after a
    worker died: the group restarts from it)."""

    job: RayJob
    rank: int
    world: int
    data: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None

    def saved(self) -> dict[str, Any] | None:
        """The latest checkpoint's state, or None on a fresh start."""
        return load(self.checkpoint) if self.checkpoint else None

    def train_loader(self, batch_size: int, seed: int) -> DataLoader:
        """This worker's shard of the training set at the global `batch_size`, reshuffled by (seed, epoch) once
        `set_epoch` is called (a multi-task run drawing equal shares: kiln.train.multitask.EqualShares); Ray's
        preparation moves its batches to the worker's device."""
        dataset = to_dataset(self.data["x_train"], self.data["y_train"])
        sampler = (equal_shares(self.data, seed, self.rank, self.world) or
                   DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=seed))
        loader = DataLoader(dataset, batch_size=max(1, batch_size // self.world), sampler=sampler)
        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)  # the sampler shards already

    def val_loader(self) -> DataLoader:
        """A sharded loader over the whole validation split."""
        return _val_loader(self.data["x_val"], self.data["y_val"])

    def task_val_loaders(self) -> list[DataLoader]:
        """A sharded loader per task's validation split (one task: its only split)."""
        return [_val_loader(x, y) for x, y in validation_sets(self.data)]

    def epoch_log(self, key: str) -> EpochLog | None:
        """Rank 0's per-epoch MLflow logging into the job's run for `key`, when it has one. MLflow is imported only
        here, keeping its ~1,500 modules out of workers that do not log."""
        run_id = self.job.mlflow_runs.get(key)
        if self.rank != 0 or not run_id:
            return None
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        client = MlflowClient(self.job.tracking_uri)

        def log(metrics: dict[str, float], epoch: int) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[
                Metric(key, float(value), now, epoch) for key, value in metrics.items() if key != "epoch"])

        return log

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
        """Report `metrics` to Ray Train, with `state` (rank 0's) as the new checkpoint when given."""
        with tempfile.TemporaryDirectory() as folder:
            saved = None if state is None else ray.train.Checkpoint.from_directory(save(folder, state))
            ray.train.report(metrics, checkpoint=saved)


def _val_loader(images: np.ndarray, labels: np.ndarray) -> DataLoader:
    return ray.train.torch.prepare_data_loader(make_loader(images, labels, VAL_BATCH, False, 0))


def worker_entry(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: its context, then the job's body with the job's config."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO; kiln prints progress itself
    context = ray.train.get_context()
    worker = WorkerContext(loop_config["job"], context.get_world_rank(), context.get_world_size(),
                           ray.get(loop_config["data"]), ray.train.get_checkpoint())
    loop_config["body"](worker, loop_config["config"])


class TorchTrainer(ray.train.torch.TorchTrainer):
    """Ray's TorchTrainer less Ray 2.60's PlacementGroupCleaner. Stopping that detached actor waits out its 12 s
    timeout at the end of every run (its monitor thread is stuck in a state-API call, dashboard or not), which
    doubled a short fit's wall time here and printed a GetTimeoutError traceback. It only matters when a Train
    controller dies ungracefully, and then the placement group, scoped to the driver's job, is freed when the
    driver exits."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [callback for callback in callbacks if not isinstance(callback, PlacementGroupCleanerCallback)]


def fit(job: RayJob, body: Callable[[WorkerContext, Config], None], config: Config, data: dict[str, Any],
        callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run `body(context, config)` on the job's workers over `data` (gloo on CPU, NCCL on GPU), restarting them from
    the latest checkpoint up to `job.max_failures` times when one dies; returns the final checkpoint's state.
    `callbacks`: Ray Train's run callbacks (a tune trial's report forwarding)."""
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"job": job, "body": body, "config": config, "data": ray.put(data)},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu,
                                               resources_per_worker={"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=job.storage_path, callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Ray Train also routes print() through its logger, which would show every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    try:
        return load(trainer.fit().checkpoint)
    except ray.train.WorkerGroupError as failure:  # a worker's input error (a corrupt checkpoint) is the user's to fix
        causes = [getattr(error, "cause", error) for error in failure.worker_failures.values()]
        raise next((cause for cause in causes if isinstance(cause, InputError)), failure) from None
