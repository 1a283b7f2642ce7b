"""Every fine-tuning method in one Ray Train fit (Ray's start-up paid once): each worker trains the methods in turn
through the one loop (kiln.train.loop.run_epochs, AdaLoRA's rank allocation as its per-step hook); rank 0 prints each
epoch, logs it to the method's MLflow run and checkpoints each finished method, so a worker group restarted after a
failure skips the methods already done and starts the interrupted one again."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
from torch import nn

from kiln.core.models import build_model
from kiln.core.params import FinetuneParams
from kiln.finetune.methods import adapt, merged, saved_bytes, step_hook, trainable_parameters, with_new_head
from kiln.train.checkpoint import load, save
from kiln.train.distributed import epoch_logger, fit, shuffled_loader
from kiln.train.loop import VAL_BATCH, Hooks, Progress, run_epochs, unwrap
from kiln.train.recipe import Recipe, make_loader, make_optimizer, make_scheduler, seed_everything


@dataclass
class Tuned:
    """One method's outcome: the merged model and what training it cost."""

    model: nn.Module
    history: list[dict[str, float]]
    trainable_parameters: int
    parameters: int
    adapter_bytes: int
    wall_seconds: float


def recipe(settings: FinetuneParams, method: str) -> Recipe:
    """AdamW under a one-cycle schedule at the method's peak rate."""
    return Recipe(optimizer="adamw", lr=settings.lr[method], momentum=0.9, weight_decay=settings.weight_decay,
                  schedule="onecycle")


def _line(method: str, metrics: dict[str, float], epochs: int) -> str:
    return (f"finetune: {method} epoch {int(metrics['epoch'])}/{epochs} loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} val_loss {metrics['val_loss']:.4f} "
            f"val_acc {metrics['val_accuracy']:.4f}")


def _train(method: str, base: nn.Module, config: dict[str, Any], loaders: tuple[Any, Any], rank: int,
           parameters: int) -> dict[str, Any]:
    """Train one method on this worker; returns its merged weights, history and costs."""
    settings: FinetuneParams = config["settings"]
    train_loader, val_loader = loaders
    seed_everything(settings.seed)
    model = adapt(base, method, config["num_classes"], settings.adapters, settings.seed,
                  settings.epochs * len(train_loader))
    trainable, steps = trainable_parameters(model), recipe(settings, method)
    ddp = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(ddp, steps)
    scheduler = make_scheduler(optimizer, steps, settings.epochs, len(train_loader))
    log = epoch_logger(config["tracking_uri"], config["mlflow_runs"][method], rank)

    def report(metrics: dict[str, float], progress: Progress) -> None:
        if rank == 0:
            print(_line(method, metrics, settings.epochs), flush=True)
            if log:
                log(metrics, int(metrics["epoch"]))

    started = time.perf_counter()
    progress = run_epochs(ddp, optimizer, train_loader, settings.epochs, steps, val_loader=val_loader,
                          scheduler=scheduler, seed=settings.seed, rank=rank,
                          hooks=Hooks(on_step=step_hook(unwrap(ddp), method), on_epoch=report))
    return {"model": merged(unwrap(ddp)).state_dict(), "history": progress.history,
            "trainable_parameters": trainable, "parameters": parameters,
            "adapter_bytes": saved_bytes(unwrap(ddp), method), "wall_seconds": time.perf_counter() - started}


def finetune_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: trains each method not yet done, checkpointing after each."""
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings: FinetuneParams = config["settings"]
    data = ray.get(config["data"])
    base = build_model(**config["base_spec"])
    base.load_state_dict(ray.get(config["base_state"]))
    loaders = (shuffled_loader(data, max(1, settings.batch_size // world), settings.seed, rank, world),
               ray.train.torch.prepare_data_loader(make_loader(data["x_val"], data["y_val"], VAL_BATCH, False, 0)))
    checkpoint = ray.train.get_checkpoint()
    done = load(checkpoint)["done"] if checkpoint else {}
    parameters = sum(p.numel() for p in with_new_head(base, config["num_classes"], settings.seed).parameters())
    for method in (method for method in settings.methods if method not in done):
        done[method] = _train(method, base, config, loaders, rank, parameters)
        with tempfile.TemporaryDirectory() as folder:
            saved = ray.train.Checkpoint.from_directory(save(folder, {"done": done})) if rank == 0 else None
            ray.train.report({"method": method, **done[method]["history"][-1]}, checkpoint=saved)


def finetune(base: nn.Module, base_spec: dict[str, Any], num_classes: int, settings: FinetuneParams,
             data: dict[str, Any], storage_path: str, name: str, tracking_uri: str, mlflow_runs: dict[str, str],
             max_failures: int) -> dict[str, Tuned]:
    """Train every method of `settings` from `base` on `data` (train and val splits) in one Ray Train fit; returns
    each method's merged model (in eval mode, `base_spec` with `num_classes`) and costs."""
    config = {"settings": settings, "base_spec": base_spec, "base_state": ray.put(base.state_dict()),
              "num_classes": num_classes, "data": ray.put(data), "tracking_uri": tracking_uri,
              "mlflow_runs": mlflow_runs}
    done = fit(finetune_worker, config, settings.num_workers, settings.cpus_per_worker, False, storage_path, name,
               max_failures)["done"]
    tuned = {}
    for method in settings.methods:
        model = build_model(**{**base_spec, "num_classes": num_classes})
        model.load_state_dict(done[method].pop("model"))
        tuned[method] = Tuned(model.eval(), **done[method])
    return tuned
