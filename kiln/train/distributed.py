"""Data-parallel training of the train stage and multi-worker tune trials: what each worker trains (`train_worker`,
a body of kiln.train.job's entry) and its config (`TrainConfig`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from kiln.core.models import build_model
from kiln.core.multitask import TaskLayout
from kiln.core.params import EarlyStoppingParams
from kiln.train.checkpoint import restore, training_state
from kiln.train.job import WorkerContext
from kiln.train.loop import EarlyStopping, Hooks, Progress, run_epochs
from kiln.train.multitask import multitask_hooks
from kiln.train.recipe import Recipe, make_optimizer, make_scheduler, seed_everything, with_values

MODES = {"val_accuracy": "max", "val_loss": "min"}  # early stopping's direction by metric


@dataclass(frozen=True)
class TrainConfig:
    """What a train worker builds and trains: the model (`spec`, then `initial_state`'s weights when given), how, for
    how long, and when it stops early."""

    spec: dict[str, Any]
    recipe: Recipe
    batch_size: int  # global: split across the workers
    epochs: int
    seed: int
    early_stopping: EarlyStoppingParams
    initial_state: ray.ObjectRef | None = None


def train_config(spec: dict[str, Any], recipe: Recipe, values: Mapping[str, Any], epochs: int,
                 early_stopping: EarlyStoppingParams, initial_state: ray.ObjectRef | None = None) -> TrainConfig:
    """The train stage's or a tune trial's config: `spec` and `recipe` with `values` (tuned or sampled dropout,
    batch_size, seed, lr, ...) in their place."""
    return TrainConfig({**spec, "dropout": values["dropout"]}, with_values(recipe, values), int(values["batch_size"]),
                       epochs, values["seed"], early_stopping, initial_state)


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


def train_worker(context: WorkerContext, config: TrainConfig) -> None:
    """Builds the model, optimiser and shards, resumes from the latest checkpoint after a worker died, and runs the
    one loop (kiln.train.loop.run_epochs). Rank 0 alone prints a line per epoch, logs to MLflow (the job's "train"
    run) and writes checkpoints; every rank reports."""
    rank, recipe, epochs = context.rank, config.recipe, config.epochs
    seed_everything(config.seed)
    model = build_model(**config.spec)
    if config.initial_state is not None:
        model.load_state_dict(ray.get(config.initial_state))
    layout: TaskLayout | None = context.data.get("layout")  # a multi-task run's tasks
    train_loader = context.train_loader(config.batch_size, config.seed)
    val_loaders = context.task_val_loaders()
    val_loader = None if layout else val_loaders[0]
    device = ray.train.torch.get_device()
    if recipe.channels_last:
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.to(device), recipe)
    scheduler = make_scheduler(optimizer, recipe, epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if recipe.amp == "fp16" else None
    stopping = config.early_stopping
    progress = Progress(stopper=EarlyStopping(**stopping.model_dump(), mode=MODES[stopping.metric]))
    if context.checkpoint is not None:  # a worker died: the group restarts from the latest epoch
        progress = restore(context.saved(), model, optimizer, scheduler, scaler)
        if rank == 0:
            print(f"train: resuming after epoch {progress.epoch} from {context.checkpoint.path}", flush=True)
    model = ray.train.torch.prepare_model(model)
    nodes = _worker_nodes(context.world)
    log = context.epoch_log("train")

    def report(metrics: dict[str, float], progress: Progress) -> None:
        state = None
        if rank == 0:
            now = time.perf_counter()
            print(_progress_line(metrics, epochs, now - epoch_started[0], layout.names if layout else ()), flush=True)
            epoch_started[0] = now
            if log:
                log(metrics, int(metrics["epoch"]))
            state = training_state(model, optimizer, scheduler, scaler, progress, worker_nodes=nodes)
        context.report({**metrics, "node_id": nodes[rank]}, state)

    epoch_started = [time.perf_counter()]
    extra = multitask_hooks(layout, val_loaders, recipe.label_smoothing) if layout else {}
    progress = run_epochs(model, optimizer, train_loader, epochs, recipe, val_loader=val_loader, scheduler=scheduler,
                          scaler=scaler, progress=progress, seed=config.seed, rank=rank,
                          hooks=Hooks(on_epoch=report, **extra))
    stopper = progress.stopper
    if rank == 0 and progress.epoch < epochs:
        print(f"train: early stop after epoch {progress.epoch}: no {stopper.metric} gain for {stopper.patience} "
              f"epochs; keeping epoch {stopper.best_epoch}'s weights", flush=True)
