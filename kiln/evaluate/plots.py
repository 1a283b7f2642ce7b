"""Figures of the evaluate stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kiln.core.plotting import plt, save_figure

ATTRIBUTION_CELL_INCHES = (2.2, 2.8)  # width, height of one cell of save_attribution_grid


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
    save_figure(figure, path)


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
    save_figure(figure, path)


def save_attribution_grid(images: np.ndarray, attributions: np.ndarray, actual: Sequence[str],
                          predicted: Sequence[str], path: Path, title: str, columns: int = 5) -> tuple[int, int]:
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
    figure.suptitle(title, fontsize=9)
    save_figure(figure, path)
    return rows, columns


def save_deletion_curves(fractions: Sequence[float], curves: Mapping[str, Sequence[float]],
                         labels: Mapping[str, str], path: Path, title: str) -> None:
    """Accuracy against the fraction of pixels deleted, one line per attribution method and a dashed one for
    deleting at random."""
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        axis.plot(fractions, curve, marker="o", label=labels[name], linestyle="--" if name == "random" else "-",
                  color="grey" if name == "random" else None)
    axis.set(xlabel="fraction of pixels deleted (most attributed first)", ylabel="accuracy", ylim=(0, 1.02),
             title=title)
    axis.legend()
    axis.grid(alpha=0.3)
    save_figure(figure, path)
