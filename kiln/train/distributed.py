"""Data-parallel training with Ray Train (PyTorch DDP): what each worker runs, and the driver call."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from torch.utils.data import DataLoader, DistributedSampler

from kiln.core.errors import InputError
from kiln.core.models import build_model
from kiln.core.multitask import TaskLayout
from kiln.train.checkpoint import load, restore, save, training_state
from kiln.train.loop import VAL_BATCH, EarlyStopping, Hooks, Progress, run_epochs
from kiln.train.multitask import equal_shares, multitask_hooks, validation_sets
from kiln.train.recipe import make_loader, make_optimizer, make_scheduler, seed_everything, to_dataset


class TorchTrainer(ray.train.torch.TorchTrainer):
    """Ray's TorchTrainer less Ray 2.60's PlacementGroupCleaner. Stopping that detached actor waits out its 12 s
    timeout at the end of every run (its monitor thread is stuck in a state-API call, dashboard or not), which
    doubled a short fit's wall time here and printed a GetTimeoutError traceback. It only matters when a Train
    controller dies ungracefully, and then the placement group, scoped to the driver's job, is freed when the
    driver exits."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [callback for callback in callbacks if not isinstance(callback, PlacementGroupCleanerCallback)]


def shuffled_loader(data: dict[str, Any], batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """This worker's shard of the training set, reshuffled by (seed, epoch) once `set_epoch` is called (a multi-task
    run drawing equal shares: kiln.train.multitask.EqualShares); Ray's preparation moves its batches to the worker's
    device."""
    dataset = to_dataset(data["x_train"], data["y_train"])
    sampler = (equal_shares(data, seed, rank, world) or
               DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed))
    return ray.train.torch.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, sampler=sampler),
                                               add_dist_sampler=False)  # the sampler shards already


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, by rank."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _progress_line(metrics: dict[str, float], epochs: int, seconds: float, tasks: tuple[str, ...] = ()) -> str:
    epoch = int(metrics["epoch"])
    per_task = "".join(f" | {task} val_loss {metrics[f'val_loss_{task}']:.4f} val_acc "
                       f"{metrics[f'val_accuracy_{task}']:.4f}" for task in tasks)
    return (f"train: epoch {epoch}/{epochs} loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.4f}{per_task} "
            f"{metrics['images_per_second']:.0f} img/s ETA {seconds * (epochs - epoch):.0f}s")


EpochLog = Callable[[dict[str, float], int], None]  # (metrics, step)


def epoch_logger(tracking_uri: str | None, run_id: str | None, rank: int) -> EpochLog | None:
    """Rank 0's per-epoch MLflow logging into run `run_id` when the driver passed one (inside a tune trial, Tune's
    MLflow callback logs the reported metrics instead). MLflow is imported only here, keeping its ~1,500 modules out
    of workers that do not log."""
    if rank != 0 or not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)

    def log(metrics: dict[str, float], epoch: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric(key, float(value), now, epoch) for key, value in metrics.items() if key != "epoch"])

    return log


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: builds the model, optimiser and shards, resumes from the latest checkpoint
    after a worker died, and runs the one loop (kiln.train.loop.run_epochs). Rank 0 alone prints a line per epoch,
    logs to MLflow (given a run id) and writes checkpoints; every rank reports."""
    logging.getLogger().setLevel(logging.WARNING)  # Ray Train logs every report at INFO; kiln prints progress itself
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(config["seed"])
    data, recipe, epochs = ray.get(config["data"]), config["recipe"], config["epochs"]
    model = build_model(**config["spec"])
    if config.get("initial_state") is not None:
        model.load_state_dict(ray.get(config["initial_state"]))
    layout: TaskLayout | None = data.get("layout")  # a multi-task run's tasks
    train_loader = shuffled_loader(data, max(1, config["batch_size"] // world), config["seed"], rank, world)
    val_loaders = [ray.train.torch.prepare_data_loader(make_loader(x, y, VAL_BATCH, False, 0))
                   for x, y in validation_sets(data)]
    val_loader = None if layout else val_loaders[0]
    device = ray.train.torch.get_device()
    if recipe.channels_last:
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.to(device), recipe)
    scheduler = make_scheduler(optimizer, recipe, epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if recipe.amp == "fp16" else None
    progress = Progress(stopper=EarlyStopping(**config["early_stopping"]))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a worker died: the group restarts from the latest epoch
        progress = restore(load(checkpoint), model, optimizer, scheduler, scaler)
        if rank == 0:
            print(f"train: resuming after epoch {progress.epoch} from {checkpoint.path}", flush=True)
    model = ray.train.torch.prepare_model(model)
    nodes = _worker_nodes(world)
    log = epoch_logger(config.get("tracking_uri"), config.get("mlflow_run_id"), rank)

    def report(metrics: dict[str, float], progress: Progress) -> None:
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                now = time.perf_counter()
                print(_progress_line(metrics, epochs, now - epoch_started[0], layout.names if layout else ()),
                      flush=True)
                epoch_started[0] = now
                if log:
                    log(metrics, int(metrics["epoch"]))
                state = training_state(model, optimizer, scheduler, scaler, progress, worker_nodes=nodes)
                saved = ray.train.Checkpoint.from_directory(save(folder, state))
            ray.train.report({**metrics, "node_id": nodes[rank]}, checkpoint=saved)

    epoch_started = [time.perf_counter()]
    extra = multitask_hooks(layout, val_loaders, recipe.label_smoothing) if layout else {}
    progress = run_epochs(model, optimizer, train_loader, epochs, recipe, val_loader=val_loader, scheduler=scheduler,
                          scaler=scaler, progress=progress, seed=config["seed"], rank=rank,
                          hooks=Hooks(on_epoch=report, **extra))
    stopper = progress.stopper
    if rank == 0 and progress.epoch < epochs:
        print(f"train: early stop after epoch {progress.epoch}: no {stopper.metric} gain for {stopper.patience} "
              f"epochs; keeping epoch {stopper.best_epoch}'s weights", flush=True)


def fit(worker: Callable[[dict[str, Any]], None], config: dict[str, Any], num_workers: int, cpus_per_worker: int,
        use_gpu: bool, storage_path: str, name: str, max_failures: int) -> dict[str, Any]:
    """Run `worker` (`train_worker`, or compression's recovery worker) on `num_workers` Ray Train workers (gloo on
    CPU, NCCL on GPU), restarting them from the latest checkpoint in `storage_path` (a folder or a cloud URI) up to
    `max_failures` times when one dies; returns the final checkpoint's state."""
    trainer = TorchTrainer(
        worker,
        train_loop_config=config,
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
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
