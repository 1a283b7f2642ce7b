"""Paired significance tests for comparing two classifiers on the same test items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


@dataclass(frozen=True)
class McNemar:
    b: int  # items only the first classifier gets right
    c: int  # items only the second classifier gets right
    p_value: float


def mcnemar_exact(first_correct: np.ndarray, second_correct: np.ndarray) -> McNemar:
    """Exact two-sided McNemar test: a binomial test (p = 1/2) on the discordant pairs."""
    first, second = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"paired arrays differ in shape: {first.shape} vs {second.shape}")
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    p_value = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    return McNemar(b, c, float(p_value))
