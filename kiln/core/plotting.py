"""Headless matplotlib (Agg) and the one way figures are written: atomically, as PNG. Each stage's figures live in
its own package (kiln/<stage>/plots.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kiln.core.files import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(figure: plt.Figure, path: Path) -> None:
    """Lay out `figure`, write it to `path` as PNG (atomically) and close it."""
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
