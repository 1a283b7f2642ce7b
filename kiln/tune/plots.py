"""Figures of the tune stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kiln.core.plotting import plt, save_figure


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
    save_figure(figure, path)


def save_best_so_far(curve: pd.DataFrame, metric: str, path: Path) -> None:
    """Best `metric` found so far against the trial-epochs spent to find it."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.step(curve["trial_epochs"], curve["best_so_far"], where="post")
    axis.set(xlabel="trial-epochs spent", ylabel=f"best {metric} so far", title="search progress")
    axis.grid(alpha=0.3)
    save_figure(figure, path)
