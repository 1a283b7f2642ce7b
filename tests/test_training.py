"""The training recipe's parts on real tensors and models: zoo, augmentation, schedules, adversarial examples, early
stopping, starting weights, channel pruning of the CPU CNN, and the train stage's input checks (before any Ray)."""

from __future__ import annotations

import copy
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kiln.core.adversarial import fgsm, pgd
from kiln.core.model_catalog import MODELS
from kiln.core.models import build_model, check_fits, load_weights
from kiln.core.params import AugmentParams, apply_overrides, validate_params
from kiln.platform.contract import stages
from kiln.train.augment import augment, random_crop, random_erasing
from kiln.train.checkpoint import restore, training_state
from kiln.train.loop import EarlyStopping, Hooks, Progress, run_epochs, train_epoch
from kiln.train.recipe import (
    Recipe,
    apply_hyperparameters,
    make_loader,
    make_optimizer,
    make_recipe,
    make_scheduler,
)
from tests.conftest import REPO, TINY_PARAMS, repo_env


def plain(**fields: Any) -> Recipe:
    """A recipe stating every field (SGD at 0.05, constant rate, no augmentation, smoothing or adversarial examples),
    with `fields` in place."""
    return dataclasses.replace(Recipe(
        optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, schedule="constant", warmup_epochs=0.0,
        label_smoothing=0.0, augment=AugmentParams(), adversarial="none", adversarial_epsilon=0.0,
        adversarial_ratio=0.0, pgd_steps=3, amp="none", channels_last=False), **fields)


def test_zoo_models_fit_grey_28_and_colour_32_images() -> None:
    for name in (*MODELS, "torchvision:resnet18", "torchvision:mobilenet_v3_small"):
        for channels, side in ((1, 28), (3, 32)):
            model = build_model(name, channels, 10, side, [0.5] * channels, [0.25] * channels, dropout=0.1)
            check_fits(model, channels, side, 10, name)
    stem = build_model("torchvision:resnet18", 1, 10, 28, [0.5], [0.25])[1].conv1
    assert (stem.in_channels, stem.kernel_size, stem.stride) == (1, (3, 3), (1, 1)), "adapted to small images"


def test_a_model_too_deep_for_the_images_is_refused() -> None:
    model = build_model("torchvision:alexnet", 1, 10, 8, [0.5], [0.25])
    with pytest.raises(ValueError, match=r"'torchvision:alexnet' cannot take 1x8x8 images"):
        check_fits(model, 1, 8, 10, "torchvision:alexnet")


def test_local_weights_load_by_name_and_shape(tmp_path: Path) -> None:
    source = build_model("compact", 1, 10, 28, [0.5], [0.25])
    torch.save(source[1].state_dict(), tmp_path / "weights.pt")
    target = build_model("compact", 3, 5, 32, [0.5] * 3, [0.25] * 3)  # other channels and classes
    skipped = load_weights(target, tmp_path / "weights.pt")
    assert skipped == ["classifier.2.weight", "classifier.5.bias", "classifier.5.weight", "features.0.weight"]
    assert torch.equal(target[1].features[4].weight, source[1].features[4].weight)


def test_augmentation_changes_images_and_off_is_identity() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 1, 28, 28)
    assert augment(images, AugmentParams()) is images
    shifted = random_crop(images, 2)
    assert shifted.shape == images.shape and not torch.equal(shifted, images)
    erased = random_erasing(torch.ones(400, 1, 28, 28), 0.5)
    hit = (erased == 0).flatten(1).any(1).float().mean()
    assert 0.4 < hit < 0.6, "about half the images lose a rectangle"
    full = AugmentParams(crop_padding=2, hflip=True, rotation=15, translate=0.1, scale=0.1, erasing=0.5)
    out = augment(images, full)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


def test_one_cycle_and_cosine_warm_up_shape_the_rate() -> None:
    model = torch.nn.Linear(4, 2)
    for schedule in ("onecycle", "cosine"):
        recipe = plain(lr=0.1, schedule=schedule, warmup_epochs=1)
        optimizer = make_optimizer(model, recipe)
        scheduler = make_scheduler(optimizer, recipe, epochs=4, steps_per_epoch=10)
        rates = []
        for _ in range(40):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        peak = max(range(40), key=rates.__getitem__)
        assert rates[0] < 0.05 and 0.09 < rates[peak] <= 0.1 + 1e-9 and rates[-1] < 0.01, schedule
        assert 5 <= peak <= 15, f"{schedule} peaks after its warm-up"
    assert make_scheduler(optimizer, plain(schedule="constant"), 4, 10) is None


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_one_cycle_cycles_the_recipes_momentum(optimizer_name: str) -> None:
    """The tuned momentum reaches the optimiser: one-cycle dips it by 0.1 at the peak rate instead of replacing it
    with PyTorch's default 0.85-0.95."""
    recipe = plain(optimizer=optimizer_name, lr=0.1, momentum=0.8, schedule="onecycle")
    optimizer = make_optimizer(torch.nn.Linear(4, 2), recipe)
    scheduler = make_scheduler(optimizer, recipe, epochs=4, steps_per_epoch=10)
    momenta = []
    for _ in range(40):
        group = optimizer.param_groups[0]
        momenta.append(group["betas"][0] if "betas" in group else group["momentum"])
        optimizer.step()
        scheduler.step()
    assert momenta[0] == pytest.approx(0.8) and min(momenta) == pytest.approx(0.7, abs=1e-3)


def test_optimizers_decay_weights_only_and_take_perturbed_values() -> None:
    model = build_model("compact", 1, 10, 28, [0.5], [0.25])
    for name in ("sgd", "adamw"):
        optimizer = make_optimizer(model, plain(optimizer=name, weight_decay=0.01))
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.01, 0.0]
        assert all(p.ndim > 1 for p in optimizer.param_groups[0]["params"])
        apply_hyperparameters(optimizer, plain(lr=0.3, momentum=0.5, weight_decay=0.02))
        assert [group["weight_decay"] for group in optimizer.param_groups] == [0.02, 0.0]
        assert optimizer.param_groups[1]["lr"] == 0.3
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["betas"][0] == 0.5


@pytest.fixture(scope="module")
def trained(prepared: Path) -> tuple[torch.nn.Module, torch.utils.data.DataLoader]:
    """A compact CNN after three epochs on digits, with its training loader."""
    from kiln.core.prepared import load_split, read_manifest

    manifest = read_manifest(prepared)
    torch.manual_seed(0)
    model = build_model("compact", 1, 10, 8, **manifest["normalization"])
    loader = make_loader(*load_split(prepared, "train"), 64, True, 0)
    recipe = plain(lr=0.05, schedule="onecycle")
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, 3, len(loader))
    for _ in range(3):
        stats = train_epoch(model, loader, optimizer, recipe, scheduler)
    assert stats.accuracy > 0.8
    return model.eval(), loader


def test_adversarial_examples_stay_in_the_ball_and_hurt(trained: tuple) -> None:
    model, loader = trained
    images, labels = next(iter(loader))
    clean = (model(images).argmax(1) == labels).float().mean()
    for attack in (fgsm(model, images, labels, 0.1), pgd(model, images, labels, 0.1, steps=5)):
        assert (attack - images).abs().max() <= 0.1 + 1e-6 and attack.min() >= 0 and attack.max() <= 1
        assert (model(attack).argmax(1) == labels).float().mean() < clean


def test_adversarial_training_runs_and_reports_the_mixed_batch(trained: tuple) -> None:
    model, loader = trained
    images, labels = loader.dataset.tensors
    small = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images[:256], labels[:256]), batch_size=64)
    recipe = plain(lr=0.01, adversarial="pgd", adversarial_epsilon=0.1, adversarial_ratio=0.5, pgd_steps=2)
    model = copy.deepcopy(model)  # the fixture's model stays as trained
    stats = train_epoch(model, small, make_optimizer(model, recipe), recipe)
    assert stats.images == 256 and 0 < stats.accuracy < 1


def test_early_stopping_counts_epochs_without_gain() -> None:
    stopper = EarlyStopping(metric="val_loss", mode="min", patience=2, min_delta=0.01)
    decisions = [stopper.update({"epoch": e, "val_loss": v}) for e, v in enumerate([1.0, 0.8, 0.795, 0.9], 1)]
    assert decisions == [False, False, False, True] and stopper.best_epoch == 2
    assert not any(EarlyStopping(patience=0).update({"epoch": e, "val_accuracy": 0.5}) for e in range(1, 9))


def digits_loader(batch_size: int = 64, shuffle: bool = True) -> torch.utils.data.DataLoader:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:512] * 255 / 16).round().astype("uint8")[:, None]
    return make_loader(images, digits.target[:512], batch_size, shuffle=shuffle, seed=0)


def fresh(recipe: Recipe, epochs: int, loader: torch.utils.data.DataLoader) -> tuple:
    torch.manual_seed(0)
    model = build_model("compact", 1, 10, 8, [0.5], [0.25], dropout=0.1)
    optimizer = make_optimizer(model, recipe)
    return model, optimizer, make_scheduler(optimizer, recipe, epochs, len(loader))


def test_one_loop_resumed_from_its_checkpoint_matches_an_uninterrupted_run() -> None:
    recipe, loader = plain(lr=0.05, schedule="onecycle", augment=AugmentParams(crop_padding=1)), digits_loader()
    val = digits_loader(512, shuffle=False)
    model, optimizer, scheduler = fresh(recipe, 4, loader)
    whole = run_epochs(model, optimizer, loader, 4, recipe, val_loader=val, scheduler=scheduler, seed=7)
    first, optimizer1, scheduler1 = fresh(recipe, 4, loader)
    half = run_epochs(first, optimizer1, digits_loader(), 2, recipe, val_loader=val, scheduler=scheduler1, seed=7)
    state = training_state(first, optimizer1, scheduler1, None, half)
    second, optimizer2, scheduler2 = fresh(recipe, 4, loader)  # a new process would build all of these again
    progress = restore(state, second, optimizer2, scheduler2)
    resumed = run_epochs(second, optimizer2, digits_loader(), 4, recipe, val_loader=val, scheduler=scheduler2,
                         seed=7, progress=progress)
    drop = ("images_per_second",)  # the one figure that depends on the clock
    assert [{k: v for k, v in row.items() if k not in drop} for row in resumed.history] == [
        {k: v for k, v in row.items() if k not in drop} for row in whole.history]
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), model.state_dict().values(),
                                                 strict=True))


def test_hooks_replace_the_loss_and_see_every_step() -> None:
    loader, recipe = digits_loader(), plain(momentum=0.0, weight_decay=0.0)
    model, optimizer, _ = fresh(recipe, 2, loader)
    before = [value.clone() for value in model.parameters()]
    steps = []
    seen = []

    def no_signal(logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(len(images))
        return 0.0 * logits.sum()

    progress = run_epochs(model, optimizer, loader, 2, recipe,
                          hooks=Hooks(loss=no_signal, on_step=lambda: steps.append(1),
                                      on_epoch=lambda metrics, progress: seen.append(metrics["epoch"])))
    assert len(steps) == 2 * len(loader) and progress.epoch == 2 and "val_loss" not in progress.history[0]
    assert seen[len(loader)] == 1 and seen[-1] == 2, "on_epoch after each epoch's steps"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)), "the hook's loss ruled"


def test_a_diverging_run_fails_naming_the_epoch() -> None:
    loader = digits_loader()
    model, optimizer, _ = fresh(plain(), 1, loader)
    with pytest.raises(FloatingPointError, match="diverged at epoch 1"):
        run_epochs(model, optimizer, loader, 1, plain(),
                   hooks=Hooks(loss=lambda logits, images, labels: logits.sum() * float("nan")))
    assert Progress().epoch == 0


def test_recipe_comes_from_params_with_tuned_values_first() -> None:
    params = validate_params(apply_overrides(TINY_PARAMS, {"train.augmentation.digits": {"rotation": 5}}))
    recipe = make_recipe(params.train, "digits", {"lr": 0.3, "batch_size": 16, "dropout": 0.2})
    assert recipe.lr == 0.3 and recipe.augment == AugmentParams(rotation=5)
    assert recipe.weight_decay == params.train.weight_decay, "params.yaml's, not a default of Recipe's"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.model": "torchvision:alexnet"}, "train.model: model 'torchvision:alexnet' cannot take 1x8x8 images"),
    ({"train.batch_size": 5000}, "train.batch_size=5000 exceeds the"),
    ({"train.model": "torchvision:nonet"}, "unknown torchvision classification model 'nonet'"),
])
def test_train_stage_refuses_bad_input_before_ray_starts(prepared: Path, tmp_path: Path, overrides: dict,
                                                         message: str) -> None:
    params = apply_overrides(TINY_PARAMS, {"train.use_tuned": False, **overrides})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared").symlink_to(prepared)
    env = {**repo_env(), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    command = [sys.executable, *shlex.split(stages(REPO)["train"].cmd)[1:]]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert "Ray" not in result.stdout + result.stderr.replace(message, ""), "failed after Ray started"
    assert time.monotonic() - started < 60
    assert not (tmp_path / "models").exists(), "nothing written"
