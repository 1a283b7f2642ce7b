"""The target of a fine-tune: finetune_data's prepared splits, the few-shot training subset, and the base that
finetune.base names, checked against them (its input, every adapter's target modules), all before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient

from kiln.core.errors import InputError
from kiln.core.params import Params
from kiln.core.prepared import load_split, per_class, read_manifest
from kiln.evaluate.registry import resolve_version
from kiln.finetune.base import Base, load_base
from kiln.finetune.catalog import ADAPTERS
from kiln.finetune.methods import check_targets


@dataclass(frozen=True)
class Target:
    """The target's manifest, what a fit trains and validates on (`fit_data`) and its test split."""

    manifest: dict[str, Any]
    fit_data: dict[str, np.ndarray]  # x_train, y_train (the few shots), x_val, y_val
    x_test: np.ndarray
    y_test: np.ndarray


def few_shots(labels: np.ndarray, shots: int, seed: int, classes: list[str]) -> np.ndarray:
    """The training indices: `shots` per class (all when 0); InputError naming the key when a class has fewer."""
    if shots == 0:
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=len(classes))
    short = int(np.argmin(counts))
    if counts[short] < shots:
        raise InputError(f"finetune.shots_per_class: {shots} exceeds the {counts[short]} training images of class "
                         f"{classes[short]!r}")
    return per_class(labels, shots, seed)


def load_target(data: Path, shots_per_class: int, seed: int) -> Target:
    """The prepared target in `data`, its training split cut to `shots_per_class` per class (all when 0)."""
    manifest = read_manifest(data)
    x_train, y_train = load_split(data, "train")
    shots = few_shots(y_train, shots_per_class, seed, manifest["classes"])
    x_val, y_val = load_split(data, "val")
    return Target(manifest, {"x_train": x_train[shots], "y_train": y_train[shots], "x_val": x_val, "y_val": y_val},
                  *load_split(data, "test"))


def check_target(base: Base, manifest: dict, params: Params) -> None:
    """InputError naming the finetune.target key when the target is data the base learnt from (its test split would
    hold images the base trained on) or the base cannot take the target's images."""
    if manifest["dataset"] in (base.datasets or ()):
        raise InputError(f"finetune.target.dataset: {manifest['dataset']} is what base {base.name} v{base.version} "
                         f"learnt from ({', '.join(base.datasets)}), so the fine-tune's test split would hold images "
                         "it trained on; fine-tune on another dataset")
    channels, side, _ = manifest["image_shape"]
    spec = base.saved["spec"]
    if channels != spec["in_channels"]:
        raise InputError(f"finetune.target.dataset: {params.finetune.target.dataset} has {channels}-channel images "
                         f"but base {base.name} v{base.version} takes {spec['in_channels']} channels")
    if side != spec["image_size"]:
        raise InputError(f"finetune.target.image_side: the target's images are {side}x{side} but base {base.name} "
                         f"v{base.version} takes {spec['image_size']}x{spec['image_size']}; set image_side: "
                         f"{spec['image_size']}")


def split_note(base: Base, dataset: str) -> str:
    """Whether the target's test split is clean of the base's training data, for the methods table."""
    if base.datasets is None:
        return (f"Target {dataset}: base {base.name} v{base.version} does not record what it learnt from (registered "
                "before kiln tagged it), so the test split may overlap the base's training data.")
    return (f"Target {dataset}: not among the datasets base {base.name} v{base.version} learnt from "
            f"({', '.join(base.datasets)}), so no test image was seen in training.")


def checked_base(params: Params, manifest: dict) -> Base:
    """The version of tracking.registered_model that finetune.base names, checked against the target's images and
    every adapter method's target modules."""
    settings, name = params.finetune, params.tracking.registered_model
    base = load_base(MlflowClient(), name, resolve_version(MlflowClient(), name, settings.base))
    check_target(base, manifest, params)
    for method in (method for method in settings.methods if method in ADAPTERS):
        check_targets(base.model, method, settings.adapters[method])
    return base
