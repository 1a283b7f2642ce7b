"""Data-parallel training with Ray Train (PyTorch DDP): the per-worker loop and the driver call."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from torch.utils.data import DataLoader, DistributedSampler

from kiln.models import build_model
from kiln.training import (
    EarlyStopping,
    evaluate,
    make_loader,
    make_optimizer,
    make_scheduler,
    seed_everything,
    to_dataset,
    train_epoch,
)

CHECKPOINT_FILE = "state.pt"


class TorchTrainer(ray.train.torch.TorchTrainer):
    """Ray's TorchTrainer less Ray 2.60's PlacementGroupCleaner. Stopping that detached actor waits out its 12 s
    timeout at the end of every run (its monitor thread is stuck in a state-API call, dashboard or not), which
    doubled a short fit's wall time here and printed a GetTimeoutError traceback. It only matters when a Train
    controller dies ungracefully, and then the placement group, scoped to the driver's job, is freed when the
    driver exits."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [callback for callback in callbacks if not isinstance(callback, PlacementGroupCleanerCallback)]


def read_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state a kiln checkpoint (Ray Train's or a Tune trial's) holds."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def write_state(folder: str, state: dict[str, Any]) -> str:
    """Save `state` as a kiln checkpoint in `folder`; returns the folder."""
    torch.save(state, Path(folder) / CHECKPOINT_FILE)
    return folder


def _shuffled_loader(data: dict[str, Any], batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """This worker's shard of the training set, reshuffled by (seed, epoch) once `set_epoch` is called; Ray's
    preparation moves its batches to the worker's device."""
    dataset = to_dataset(data["x_train"], data["y_train"])
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return ray.train.torch.prepare_data_loader(DataLoader(dataset, batch_size=batch_size, sampler=sampler))


def _worker_nodes(world: int) -> list[str]:
    """The Ray node id of every worker, by rank."""
    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _progress(epoch: int, epochs: int, metrics: dict[str, float], seconds: float) -> str:
    return (f"train: epoch {epoch}/{epochs} loss {metrics['train_loss']:.4f} acc {metrics['train_accuracy']:.4f} "
            f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.4f} "
            f"{metrics['images_per_second']:.0f} img/s ETA {seconds * (epochs - epoch):.0f}s")


def _epoch_logger(config: dict[str, Any], rank: int) -> Callable[[dict[str, float], int], None] | None:
    """Rank 0's per-epoch MLflow logging when the driver passed a run id (inside a tune trial, Tune's MLflow callback
    logs the reported metrics instead). MLflow is imported only here, keeping its ~1,500 modules out of workers that
    do not log."""
    if rank != 0 or not config.get("mlflow_run_id"):
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(config["tracking_uri"])

    def log(metrics: dict[str, float], epoch: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(config["mlflow_run_id"], metrics=[
            Metric(key, float(value), now, epoch) for key, value in metrics.items() if key != "epoch"])

    return log


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 alone prints, logs to MLflow (given a run id) and writes checkpoints.

    A checkpoint holds the model, optimiser, scheduler (and fp16 grad scaler), epoch, history and early-stopping
    state. The RNG state is a function of (seed, epoch, rank): it is re-seeded at every epoch, so a run resumed from
    a checkpoint after a worker died continues exactly as the uninterrupted run would have.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(config["seed"])
    data, recipe, epochs = ray.get(config["data"]), config["recipe"], config["epochs"]
    model = build_model(**config["spec"])
    if config.get("initial_state") is not None:
        model.load_state_dict(ray.get(config["initial_state"]))
    train_loader = _shuffled_loader(data, max(1, config["batch_size"] // world), config["seed"], rank, world)
    val_loader = ray.train.torch.prepare_data_loader(make_loader(data["x_val"], data["y_val"], 512, False, 0))
    device = ray.train.torch.get_device()
    if recipe.channels_last:
        model = model.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model.to(device), recipe)
    scheduler = make_scheduler(optimizer, recipe, epochs, len(train_loader))
    scaler = torch.amp.GradScaler(device.type) if recipe.amp == "fp16" else None
    stopper = EarlyStopping(**config["early_stopping"])
    history: list[dict[str, float]] = []
    best_model = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a worker died: the group restarts from the latest epoch
        state = read_state(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for part, saved in ((scheduler, state["scheduler"]), (scaler, state["scaler"])):
            if part is not None:
                part.load_state_dict(saved)
        history, best_model, stopper = state["history"], state["best_model"], EarlyStopping(**state["early_stopping"])
        if rank == 0:
            print(f"train: resuming after epoch {state['epoch']} from {checkpoint.path}", flush=True)
    model = ray.train.torch.prepare_model(model)
    nodes = _worker_nodes(world)
    log = _epoch_logger(config, rank)
    for epoch in range(len(history) + 1, epochs + 1):
        seed_everything(config["seed"] + 1000 * epoch + rank)
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        fit = train_epoch(model, train_loader, optimizer, recipe, scheduler, scaler=scaler)
        seconds = time.perf_counter() - started
        val = evaluate(model, val_loader)
        metrics = {"epoch": epoch, "train_loss": fit.loss, "train_accuracy": fit.accuracy, "val_loss": val.loss,
                   "val_accuracy": val.accuracy, "images_per_second": fit.images / seconds,
                   "lr": optimizer.param_groups[0]["lr"]}
        history.append(metrics)
        stop = stopper.update(metrics)
        module = model.module if hasattr(model, "module") else model
        if stopper.best_epoch == epoch:
            best_model = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
        with tempfile.TemporaryDirectory() as folder:
            saved = None
            if rank == 0:
                print(_progress(epoch, epochs, metrics, seconds), flush=True)
                if log:
                    log(metrics, epoch)
                saved = ray.train.Checkpoint.from_directory(write_state(folder, {
                    "model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "history": history,
                    "early_stopping": dataclasses.asdict(stopper), "best_model": best_model, "worker_nodes": nodes}))
            ray.train.report({**metrics, "node_id": nodes[rank]}, checkpoint=saved)
        if stop:
            if rank == 0:
                print(f"train: early stop after epoch {epoch}: no {stopper.metric} gain for {stopper.patience} "
                      f"epochs; keeping epoch {stopper.best_epoch}'s weights", flush=True)
            break


def fit(config: dict[str, Any], num_workers: int, cpus_per_worker: int, use_gpu: bool, storage_path: str,
        name: str, max_failures: int) -> dict[str, Any]:
    """Run `train_worker` on `num_workers` Ray Train workers (gloo on CPU, NCCL on GPU), restarting them from the
    latest checkpoint in `storage_path` (a folder or a cloud URI) up to `max_failures` times when one dies; returns
    the final checkpoint's state."""
    trainer = TorchTrainer(
        train_worker,
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
    return read_state(trainer.fit().checkpoint)
