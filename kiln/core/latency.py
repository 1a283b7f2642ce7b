"""Latency measured side by side: every model's runner is built and warmed up first, then timed in interleaved rounds
whose order rotates, so load changes and the first-timed penalty hit every model alike. A model's figure is the
median over rounds of each round's p50; the rounds' range is the noise a speed-up has to beat."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from kiln.core.params import LatencyParams


@dataclass(frozen=True)
class Timing:
    """One model's p50 latency (ms) in each round, for one batch."""

    rounds_ms: tuple[float, ...]
    batch_size: int

    @property
    def median_ms(self) -> float:
        return float(np.median(self.rounds_ms))

    @property
    def fastest_ms(self) -> float:
        return min(self.rounds_ms)

    @property
    def slowest_ms(self) -> float:
        return max(self.rounds_ms)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        """`{prefix}_p50_ms` (the median round), its `_min`/`_max` over rounds, and `{prefix}_images_per_s`."""
        return {f"{prefix}_p50_ms": self.median_ms, f"{prefix}_p50_min_ms": self.fastest_ms,
                f"{prefix}_p50_max_ms": self.slowest_ms,
                f"{prefix}_images_per_s": self.batch_size / self.median_ms * 1e3}


def _p50_ms(run: Callable[[np.ndarray], object], batch: np.ndarray, calls: int) -> float:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds) * 1e3)


def interleaved(runners: Mapping[str, Callable[[np.ndarray], object]], batch: np.ndarray,
                settings: LatencyParams) -> dict[str, Timing]:
    """Time every runner on `batch`: `warmup_calls` untimed calls each, then `rounds` rounds in which each runner makes
    `calls` timed calls; round r starts at the r-th runner, so each runner is timed in every position."""
    names = list(runners)
    for name in names:
        for _ in range(settings.warmup_calls):
            runners[name](batch)
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(settings.rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            rounds[name].append(_p50_ms(runners[name], batch, settings.calls))
    return {name: Timing(tuple(values), len(batch)) for name, values in rounds.items()}


def batch_of(images: np.ndarray, size: int) -> np.ndarray:
    """`size` images to time with: the first ones of `images`, repeated if there are fewer."""
    return np.ascontiguousarray(np.resize(images, (size, *images.shape[1:])), dtype=np.float32)
