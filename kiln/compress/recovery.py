"""Recovery training of the structured variants (kiln.compress.catalog), data-parallel on Ray Train through the one
training loop: one fit trains them all (Ray Train's start-up is paid once), on the full training split. Before each
round, a variant's builder makes the model the round trains:

- `pruned` (variants `pruned`, `pruned_kd`): the trained model pruned in `prune_rounds` steps to `target_macs_ratio`
  of its MACs, each step followed by `recovery_epochs` of training (a cosine schedule from `recovery_lr`).
- `student` (variants `distilled`, `student`): a uniformly thinner copy at the same MACs target, re-initialised and
  trained for `student_epochs` (one-cycle at `student_lr`).

A taught variant learns from the trained model's logits (distillation), the others from the labels alone. Rank 0
prints a line per epoch, logs it to the variant's MLflow run and, after every round, writes a checkpoint holding the
finished variants and the current one's weights, so a dead worker costs at most one round.
"""

from __future__ import annotations

import copy
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.compress.catalog import FLOATS
from kiln.compress.distillation import distillation_loss
from kiln.compress.pruning import count_macs, prune_to_macs, resized, round_targets, thinned
from kiln.core.errors import InputError
from kiln.core.models import build_model
from kiln.core.params import AugmentParams, CompressParams
from kiln.core.prepared import to_float
from kiln.train.job import EpochLog, RayJob, WorkerContext, fit
from kiln.train.loop import Hooks, Loss, Progress, run_epochs, unwrap
from kiln.train.recipe import Recipe, make_optimizer, make_scheduler, seed_everything

Builder = Callable[[nn.Module, nn.Module, torch.Tensor, float, int], nn.Module]  # a catalog entry's builder
WEIGHT_DECAY = 5e-4  # the stock train recipe's
History = list[dict[str, float]]
MAX_FAILURES = 3  # worker deaths survived, each costing at most one round


@dataclass(frozen=True)
class Plan:
    """How one recovered variant is trained: `rounds` of `epochs` each, every round with a fresh schedule."""

    variant: str
    rounds: int
    epochs: int
    recipe: Recipe


def plan(variant: str, settings: CompressParams, augment: AugmentParams) -> Plan:
    """The rounds, epochs and recipe of `variant`'s schedule (kiln.compress.catalog): SGD, cosine from `recovery_lr`
    for the `pruned` schedule, one-cycle from `student_lr` for the `student` one; `augment` is the training data's
    augmentation, as the train stage used it."""
    pruned = FLOATS[variant].schedule == "pruned"
    recipe = Recipe(optimizer="sgd", lr=settings.recovery_lr if pruned else settings.student_lr, momentum=0.9,
                    weight_decay=WEIGHT_DECAY, schedule="cosine" if pruned else "onecycle", warmup_epochs=0.0,
                    label_smoothing=0.0, augment=augment, adversarial="none", adversarial_epsilon=0.0,
                    adversarial_ratio=0.0, pgd_steps=3, amp="none", channels_last=False)
    if pruned:
        return Plan(variant, settings.prune_rounds, settings.recovery_epochs, recipe)
    return Plan(variant, 1, settings.student_epochs, recipe)


def pruned(model: nn.Module, teacher: nn.Module, example: torch.Tensor, target_macs: float, seed: int) -> nn.Module:
    """The previous round's model (the trained one at first) pruned to this round's MACs target."""
    return prune_to_macs(model.cpu(), example, target_macs)


def student(model: nn.Module, teacher: nn.Module, example: torch.Tensor, target_macs: float, seed: int) -> nn.Module:
    """A uniformly thinner copy of the trained model at the MACs target, re-initialised from `seed` (the same for
    every student variant)."""
    seed_everything(seed)
    return thinned(teacher, example, target_macs)


def _progress_line(step: Plan, round_index: int, macs_ratio: float, metrics: dict[str, float]) -> str:
    return (f"compress: {step.variant} round {round_index}/{step.rounds} epoch {int(metrics['epoch'])}/{step.epochs} "
            f"MACs {macs_ratio:.2f}x loss {metrics['train_loss']:.4f} val_acc {metrics['val_accuracy']:.4f} "
            f"{metrics['images_per_second']:.0f} img/s")


@dataclass(frozen=True)
class RecoveryConfig:
    """What a recovery worker trains: `variants` of the trained model (`spec`, the `teacher` weights) as `settings`
    say, on training data augmented by `augment`."""

    spec: dict[str, Any]
    teacher: ray.ObjectRef
    variants: list[str]
    settings: CompressParams
    augment: AugmentParams


@dataclass
class Worker:
    """What one Ray Train worker holds across variants and rounds."""

    context: WorkerContext
    settings: CompressParams
    train_loader: DataLoader
    val_loader: DataLoader
    teach: Loss  # the distillation loss against the trained model
    state: dict[str, Any]  # the checkpoint's: finished variants ("done") and the variant in progress ("current")

    def train_round(self, model: nn.Module, step: Plan, round_index: int, macs_ratio: float, history: History,
                    log: EpochLog | None) -> nn.Module:
        """Train `model` (already pruned for this round) for the round's epochs in DDP; rank 0 prints and logs each
        epoch and checkpoints the round's end. Returns the trained model, unwrapped and copied for the next round."""
        ddp = ray.train.torch.prepare_model(model)
        optimizer = make_optimizer(ddp, step.recipe)
        scheduler = make_scheduler(optimizer, step.recipe, step.epochs, len(self.train_loader))

        def report(metrics: dict[str, float], progress: Progress) -> None:
            row = {**metrics, "round": round_index, "macs_ratio": macs_ratio, "epoch": len(history) + 1}
            history.append(row)
            state = None
            if self.context.rank == 0:
                print(_progress_line(step, round_index, macs_ratio, metrics), flush=True)
                if log:  # prefixed: the variant's run also holds its measured row (val_accuracy, ...)
                    log({f"recovery/{key}": value for key, value in row.items()}, int(row["epoch"]))
                if progress.epoch == step.epochs:  # the round's end
                    self.finish_round(step, round_index, unwrap(ddp), history)
                    state = self.state
            self.context.report({"variant": step.variant, **row}, state)

        run_epochs(ddp, optimizer, self.train_loader, step.epochs, step.recipe, val_loader=self.val_loader,
                   scheduler=scheduler, seed=self.settings.seed + round_index, rank=self.context.rank,
                   hooks=Hooks(loss=self.teach if FLOATS[step.variant].taught else None, on_epoch=report))
        return copy.deepcopy(unwrap(ddp))  # fresh parameters for the next round's DDP wrapper

    def finish_round(self, step: Plan, round_index: int, model: nn.Module, history: History) -> None:
        finished = {"model": model.state_dict(), "history": list(history)}
        if round_index == step.rounds:
            self.state["done"][step.variant], self.state["current"] = finished, None
        else:
            self.state["current"] = {"variant": step.variant, "round": round_index, **finished}


def recovery_worker(context: WorkerContext, config: RecoveryConfig) -> None:
    """Trains each variant of `config.variants` in turn (skipping those a previous attempt finished, resuming the one
    it was in), pruning before each round and rewrapping the model in DDP."""
    settings, device = config.settings, ray.train.torch.get_device()
    teacher = build_model(**config.spec)
    teacher.load_state_dict(ray.get(config.teacher))
    example = torch.from_numpy(to_float(context.data["x_val"][:1]))
    full_macs = count_macs(teacher.eval(), example)
    worker = Worker(
        context, settings, context.train_loader(settings.batch_size, settings.seed), context.val_loader(),
        distillation_loss(copy.deepcopy(teacher).to(device), settings.distill_temperature, settings.distill_alpha),
        context.saved() or {"done": {}, "current": None})

    for variant in config.variants:
        if variant in worker.state["done"]:
            continue
        step = plan(variant, settings, config.augment)
        targets = round_targets(full_macs, settings.target_macs_ratio, step.rounds)
        current = worker.state["current"]
        if current and current["variant"] == variant:  # a worker died: continue after the last finished round
            model = resized(build_model(**config.spec), current["model"])
            first, history = current["round"] + 1, current["history"]
        else:
            model, first, history = copy.deepcopy(teacher), 1, []
        build: Builder = pkgutil.resolve_name(FLOATS[variant].builder)
        log = context.epoch_log(variant)
        for round_index in range(first, step.rounds + 1):
            model = build(model, teacher, example, targets[round_index - 1], settings.seed)
            macs_ratio = count_macs(model.cpu().eval(), example) / full_macs
            model = worker.train_round(model, step, round_index, macs_ratio, history, log)


def check_reachable(teacher: nn.Module, example: torch.Tensor, ratio: float) -> None:
    """Fail before Ray starts, naming compress.target_macs_ratio, when pruning cannot bring `teacher` that low."""
    try:
        prune_to_macs(teacher, example, ratio * count_macs(teacher.eval(), example))
    except ValueError as error:
        raise InputError(f"compress.target_macs_ratio: {ratio:g} is out of reach for this model: {error}") from None


def recover(teacher: nn.Module, spec: dict[str, Any], variants: list[str], settings: CompressParams,
            augment: AugmentParams, data: dict[str, Any], job: RayJob) -> dict[str, nn.Module]:
    """Train `variants` (catalog entries with a builder) in one Ray Train fit on `data` augmented by `augment`;
    returns each one's model in eval mode (their per-epoch curves are in the job's MLflow run of each and the printed
    lines)."""
    check_reachable(teacher, torch.from_numpy(to_float(data["x_val"][:1])), settings.target_macs_ratio)
    started = time.perf_counter()
    config = RecoveryConfig(spec, ray.put(teacher.state_dict()), variants, settings, augment)
    state = fit(job, recovery_worker, config, data)
    print(f"compress: recovery training of {', '.join(variants)} took {time.perf_counter() - started:.0f}s",
          flush=True)
    return {variant: resized(build_model(**spec), state["done"][variant]["model"]).eval() for variant in variants}
