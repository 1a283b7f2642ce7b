"""Figures of the compress stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln.core.plotting import plt, save_figure


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
    save_figure(figure, path)
