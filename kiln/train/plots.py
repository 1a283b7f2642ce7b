"""Figures of the train stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kiln.core.plotting import plt, save_figure


def save_learning_curves(history: Sequence[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_axis.plot(epochs, [row[f"{split}_loss"] for row in history], marker="o", label=split)
        accuracy_axis.plot(epochs, [row[f"{split}_accuracy"] for row in history], marker="o", label=split)
    for axis, title in ((loss_axis, "loss"), (accuracy_axis, "accuracy")):
        axis.set(title=title, xlabel="epoch")
        axis.legend()
        axis.grid(alpha=0.3)
    save_figure(figure, path)
