"""The fine-tune stage's comparison of its methods: one row each (accuracy, trainable parameters, adapter size, wall
time), as JSON, a Markdown table, a CSV for `dvc plots` and accuracy against trainable parameters on a log axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.core.plotting import plt, save_figure

REPORTS = {"metrics": "metrics.json", "methods": "methods.json", "table": "methods.md", "curve": "methods.csv",
           "plot": "methods.png", "registration": "registration.json"}  # the stage's report files, by role
COLUMNS = ("method", "test_accuracy", "val_accuracy", "trainable_parameters", "trainable_fraction", "adapter_bytes",
           "wall_seconds")


def markdown(rows: list[dict[str, Any]], selected: str) -> str:
    """The rows as a Markdown table, the selected method marked."""
    lines = ["| method | test acc | val acc | trainable params | trainable | adapter size | wall |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        name = f"**{row['method']}** (registered)" if row["method"] == selected else row["method"]
        lines.append(f"| {name} | {row['test_accuracy']:.4f} | {row['val_accuracy']:.4f} | "
                     f"{row['trainable_parameters']:,} | {row['trainable_fraction']:.2%} | "
                     f"{row['adapter_bytes'] / 1024:.1f} KiB | {row['wall_seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def save_accuracy_plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against trainable parameters (log x), one labelled point per method."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        point = (row["trainable_parameters"], row["test_accuracy"] * 100)
        axis.scatter(*point, s=40)
        axis.annotate(row["method"], point, xytext=(6, 4), textcoords="offset points", fontsize=9)
    axis.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel="target test accuracy (%)",
             title="fine-tuning methods: accuracy against what they train")
    axis.grid(alpha=0.3, which="both")
    save_figure(figure, path)
