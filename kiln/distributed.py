"""Data-parallel training with Ray Train (PyTorch DDP): the per-worker loop and the driver call."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from mlflow import MlflowClient
from mlflow.entities import Metric
from torch.utils.data import DataLoader, DistributedSampler

from kiln.models import build_model
from kiln.training import evaluate, make_loader, make_optimizer, seed_everything, to_dataset, train_epoch

CHECKPOINT_FILE = "state.pt"


def read_state(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The training state a kiln checkpoint (Ray Train's or a Tune trial's) holds."""
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[dict]]:
    """Resume from Ray Train's latest checkpoint (after a worker failure); returns (next epoch, history)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 1, []
    state = read_state(checkpoint)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ray.train.get_context().get_world_rank() == 0:
        print(f"train: resuming after epoch {state['epoch']} from {checkpoint.path}", flush=True)
    return state["epoch"] + 1, state["history"]


def _shuffled_loader(data: dict[str, Any], batch_size: int, seed: int, rank: int, world: int) -> DataLoader:
    """This worker's shard of the training set, reshuffled by (seed, epoch) once `set_epoch` is called."""
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


def train_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; rank 0 alone prints, logs to MLflow (given a run id) and writes checkpoints.

    Randomness is re-seeded from (seed, epoch, rank) at every epoch, so a run resumed from a checkpoint after a
    worker died continues exactly as the uninterrupted run would have.
    """
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed_everything(config["seed"])
    data = ray.get(config["data"])
    hp = config["hyperparameters"]
    model = build_model(**config["spec"])
    optimizer = make_optimizer(model, hp["lr"], hp["momentum"], hp["weight_decay"])
    start_epoch, history = _restore(model, optimizer)
    model = ray.train.torch.prepare_model(model)
    train_loader = _shuffled_loader(data, max(1, int(hp["batch_size"]) // world), config["seed"], rank, world)
    val_loader = ray.train.torch.prepare_data_loader(make_loader(data["x_val"], data["y_val"], 512, False, 0))
    nodes = _worker_nodes(world)
    client = MlflowClient(config["tracking_uri"]) if rank == 0 and config.get("mlflow_run_id") else None
    epochs = config["epochs"]
    for epoch in range(start_epoch, epochs + 1):
        seed_everything(config["seed"] + 1000 * epoch + rank)
        train_loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        fit = train_epoch(model, train_loader, optimizer)
        seconds = time.perf_counter() - started
        val = evaluate(model, val_loader)
        metrics = {"epoch": epoch, "train_loss": fit.loss, "train_accuracy": fit.accuracy, "val_loss": val.loss,
                   "val_accuracy": val.accuracy, "images_per_second": fit.images / seconds}
        history.append(metrics)
        checkpoint = None
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                eta = seconds * (epochs - epoch)
                print(f"train: epoch {epoch}/{epochs} loss {fit.loss:.4f} acc {fit.accuracy:.4f} "
                      f"val_loss {val.loss:.4f} val_acc {val.accuracy:.4f} "
                      f"{metrics['images_per_second']:.0f} img/s ETA {eta:.0f}s", flush=True)
                if client:  # inside a tune trial, Tune's MLflow callback logs the reported metrics instead
                    now = int(time.time() * 1000)
                    client.log_batch(config["mlflow_run_id"], metrics=[
                        Metric(key, float(value), now, epoch) for key, value in metrics.items() if key != "epoch"])
                module = model.module if hasattr(model, "module") else model
                torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                            "history": history, "worker_nodes": nodes}, Path(folder) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({**metrics, "node_id": nodes[rank]}, checkpoint=checkpoint)


def fit(config: dict[str, Any], num_workers: int, use_gpu: bool, storage_path: Path, name: str,
        max_failures: int) -> dict[str, Any]:
    """Run `train_worker` on `num_workers` Ray Train workers, restarting them from the latest checkpoint up to
    `max_failures` times when one dies; returns the final checkpoint's state."""
    trainer = ray.train.torch.TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(storage_path.resolve()),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            # Ray Train also routes print() through its logger, which would show every progress line twice.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    return read_state(trainer.fit().checkpoint)
