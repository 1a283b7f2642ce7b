"""Figures people look at: learning curves and confusion matrices (PNG, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kiln.io import atomic_path  # noqa: E402


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
    _save(figure, path)


def save_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix with counts in each cell."""
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, axis = plt.subplots(figsize=(1.0 + 0.7 * len(classes), 0.8 + 0.6 * len(classes)))
    axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axis.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    axis.set_xticklabels(classes, rotation=45, ha="right")
    axis.set_yticklabels(classes)
    for (row, col), count in np.ndenumerate(matrix):
        axis.text(col, row, str(count), ha="center", va="center", fontsize=7,
                  color="white" if rates[row, col] > 0.5 else "black")
    _save(figure, path)


def save_hyperparameter_scatter(trials: pd.DataFrame, keys: Sequence[str], metric: str, log_scale: set[str],
                                path: Path) -> None:
    """One panel per tuned hyperparameter: its value against the trial's final `metric`, coloured by trial state."""
    figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys, strict=True):
        for state, rows in trials.groupby("state"):
            axis.scatter(rows[key], rows[metric], label=state, alpha=0.8)
        axis.set(xlabel=key, ylabel=metric, xscale="log" if key in log_scale else "linear")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    _save(figure, path)


def save_best_so_far(curve: pd.DataFrame, metric: str, path: Path) -> None:
    """Best `metric` found so far against the trial-epochs spent to find it."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.step(curve["trial_epochs"], curve[f"best_{metric}"], where="post")
    axis.set(xlabel="trial-epochs spent", ylabel=f"best {metric} so far", title="search progress")
    axis.grid(alpha=0.3)
    _save(figure, path)


def save_tradeoff(rows: Sequence[Mapping[str, Any]], selected: str, batch_size: int, path: Path) -> None:
    """Val accuracy against batch latency, one labelled marker per compression variant, its area by ONNX file size;
    int8 variants orange, the deployable one ringed in red."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    largest = max(row["onnx_bytes"] for row in rows)
    for row in rows:
        chosen = row["variant"] == selected
        point = (row["batched_p50_ms"], row["val_accuracy"] * 100)
        axis.scatter(*point, s=30 + 600 * row["onnx_bytes"] / largest, alpha=0.6,
                     color="C1" if row["variant"].endswith("int8") else "C0",
                     edgecolors="red" if chosen else "none", linewidths=2)
        axis.annotate(row["variant"] + (" (deployable)" if chosen else ""), point, xytext=(7, 5),
                      textcoords="offset points", fontsize=8)
    axis.set(xlabel=f"ONNX Runtime p50 latency at batch {batch_size} (ms)", ylabel="val accuracy (%)",
             title="compression trade-off (marker area: ONNX file size)")
    axis.grid(alpha=0.3)
    _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> None:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def save_reliability_diagram(bins: Mapping[str, Sequence[Mapping[str, float]]], eces: Mapping[str, float],
                             path: Path, title: str) -> None:
    """Accuracy against mean confidence in each confidence bin, one line per model (its ECE in the legend), marker
    area by the bin's item count; the diagonal is perfect calibration."""
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for name, rows in bins.items():
        total = sum(row["count"] for row in rows)
        confidence, accuracy = [row["confidence"] for row in rows], [row["accuracy"] for row in rows]
        (line,) = axis.plot(confidence, accuracy, alpha=0.8, label=f"{name} (ECE {eces[name]:.3f})")
        axis.scatter(confidence, accuracy, color=line.get_color(), alpha=0.6,
                     s=[10 + 300 * row["count"] / total for row in rows])
    axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="confidence (top-class probability)", ylabel="accuracy", title=title)
    axis.legend(loc="upper left")
    axis.grid(alpha=0.3)
    _save(figure, path)


ATTRIBUTION_CELL_INCHES = (2.2, 2.8)  # width, height of one cell of save_attribution_grid


def save_attribution_grid(images: np.ndarray, attributions: np.ndarray, actual: Sequence[str],
                          predicted: Sequence[str], path: Path, columns: int = 5) -> tuple[int, int]:
    """One cell per image: the image, its attributions summed over channels on top (red: for the predicted class,
    blue: against it), titled with the true and the predicted class (red when they differ). Returns (rows, columns)."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = ATTRIBUTION_CELL_INCHES
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for index, (image, attribution) in enumerate(zip(images, attributions, strict=True)):
        axis = axes.flat[index]
        dimmed = 0.5 * (image[0] if len(image) == 1 else image.transpose(1, 2, 0))  # so the colours stand out
        axis.imshow(dimmed, cmap="gray", vmin=0, vmax=1)
        heat = attribution.sum(axis=0)
        heat = heat / max(float(np.abs(heat).max()), 1e-12)
        axis.imshow(heat, cmap="bwr", vmin=-1, vmax=1, alpha=0.7 * np.abs(heat))
        axis.set_title(f"{actual[index]}\npredicted: {predicted[index]}", fontsize=8,
                       color="black" if actual[index] == predicted[index] else "red")
    figure.suptitle("Integrated Gradients towards the predicted class (red: for, blue: against)", fontsize=9)
    _save(figure, path)
    return rows, columns
