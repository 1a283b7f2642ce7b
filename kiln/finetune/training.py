"""Every fine-tuning method in one Ray Train fit (Ray's start-up paid once): each worker trains the methods in turn
through the one loop (kiln.train.loop.run_epochs, AdaLoRA's rank allocation as its per-step hook); rank 0 prints each
epoch, logs it to the method's MLflow run and checkpoints each finished method, so a worker group restarted after a
failure skips the methods already done and starts the interrupted one again."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train.torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.core.models import build_model
from kiln.core.params import AugmentParams, FinetuneParams
from kiln.finetune.methods import adapt, merged, saved_bytes, step_hook, trainable_parameters, with_new_head
from kiln.train.job import RayJob, WorkerContext, fit
from kiln.train.loop import Hooks, Progress, run_epochs, unwrap
from kiln.train.recipe import Recipe, make_optimizer, make_scheduler, seed_everything


@dataclass
class Tuned:
    """One method's outcome: the merged model and what training it cost."""

    model: nn.Module
    history: list[dict[str, float]]
    trainable_parameters: int
    parameters: int
    adapter_bytes: int
    wall_seconds: float


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tuning worker trains: every method of `settings` from the base model (`base_spec`, the
    `base_state` weights) with a new head of `num_classes`."""

    base_spec: dict[str, Any]
    base_state: ray.ObjectRef
    num_classes: int
    settings: FinetuneParams


def recipe(settings: FinetuneParams, method: str) -> Recipe:
    """AdamW under a one-cycle schedule at the method's peak rate, on plain batches."""
    return Recipe(optimizer="adamw", lr=settings.lr[method], momentum=0.9, weight_decay=settings.weight_decay,
                  schedule="onecycle", warmup_epochs=0.0, label_smoothing=0.0, augment=AugmentParams(),
                  adversarial="none", adversarial_epsilon=0.0, adversarial_ratio=0.0, pgd_steps=3, amp="none",
                  channels_last=False)


def _line(method: str, metrics: dict[str, float], epochs: int) -> str:
    return (f"finetune: {method} epoch {int(metrics['epoch'])}/{epochs} loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} val_loss {metrics['val_loss']:.4f} "
            f"val_acc {metrics['val_accuracy']:.4f}")


def _train(method: str, base: nn.Module, context: WorkerContext, config: FinetuneConfig,
           loaders: tuple[DataLoader, DataLoader], parameters: int) -> dict[str, Any]:
    """Train one method on this worker; returns its merged weights, history and costs."""
    settings, rank = config.settings, context.rank
    train_loader, val_loader = loaders
    seed_everything(settings.seed)
    model = adapt(base, method, config.num_classes, settings.adapters, settings.seed,
                  settings.epochs * len(train_loader))
    trainable, steps = trainable_parameters(model), recipe(settings, method)
    ddp = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(ddp, steps)
    scheduler = make_scheduler(optimizer, steps, settings.epochs, len(train_loader))
    log = context.epoch_log(method)

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


def finetune_worker(context: WorkerContext, config: FinetuneConfig) -> None:
    """Trains each method not yet done, checkpointing after each."""
    settings = config.settings
    base = build_model(**config.base_spec)
    base.load_state_dict(ray.get(config.base_state))
    loaders = context.train_loader(settings.batch_size, settings.seed), context.val_loader()
    done = (context.saved() or {"done": {}})["done"]
    parameters = sum(p.numel() for p in with_new_head(base, config.num_classes, settings.seed).parameters())
    for method in (method for method in settings.methods if method not in done):
        done[method] = _train(method, base, context, config, loaders, parameters)
        context.report({"method": method, **done[method]["history"][-1]}, {"done": done} if context.rank == 0 else None)


def finetune(base: nn.Module, base_spec: dict[str, Any], num_classes: int, settings: FinetuneParams,
             data: dict[str, Any], job: RayJob) -> dict[str, Tuned]:
    """Train every method of `settings` from `base` on `data` (train and val splits) in one Ray Train fit (each
    method's curves go to the job's MLflow run for it); returns each method's merged model (in eval mode,
    `base_spec` with `num_classes`) and costs."""
    config = FinetuneConfig(base_spec, ray.put(base.state_dict()), num_classes, settings)
    done = fit(job, finetune_worker, config, data)["done"]
    tuned = {}
    for method in settings.methods:
        model = build_model(**{**base_spec, "num_classes": num_classes})
        model.load_state_dict(done[method].pop("model"))
        tuned[method] = Tuned(model.eval(), **done[method])
    return tuned
