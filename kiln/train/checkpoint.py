"""kiln's one checkpoint format, written by Ray Train workers and tune trials alike: a `state.pt` holding the model,
optimiser, scheduler and fp16 grad-scaler states and the run's `Progress` (history, early stopping, best weights).
Loaded with `weights_only=True`: a checkpoint can hold tensors and plain values, never code."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ray.train
import torch
from torch import nn

from kiln.core.errors import reading
from kiln.train.loop import EarlyStopping, Progress, unwrap

STATE_FILE = "state.pt"


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler | None, scaler: torch.amp.GradScaler | None,
                   progress: Progress, **extra: Any) -> dict[str, Any]:
    """Everything needed to continue training exactly where it stopped, plus `extra` plain values."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "scaler": scaler.state_dict() if scaler else None, "epoch": progress.epoch, "history": progress.history,
            "early_stopping": dataclasses.asdict(progress.stopper), "best_model": progress.best_model, **extra}


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
            scaler: torch.amp.GradScaler | None = None) -> Progress:
    """Load `state` into the live objects; returns the progress to continue from."""
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for part, saved in ((scheduler, state["scheduler"]), (scaler, state["scaler"])):
        if part is not None:
            part.load_state_dict(saved)
    return Progress(state["history"], EarlyStopping(**state["early_stopping"]), state["best_model"])


def save(folder: str, state: dict[str, Any]) -> str:
    """`state` written into `folder`, which then holds a kiln checkpoint; returns the folder."""
    torch.save(state, Path(folder) / STATE_FILE)
    return folder


def load(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    """The state a kiln checkpoint holds."""
    with checkpoint.as_directory() as folder, reading(
            Path(checkpoint.path) / STATE_FILE, f"delete {checkpoint.path} (or its run folder) to train from scratch"):
        return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
