"""Which variant ships as the deployable model: the one place the rule is written (the variants table, selection.json
and the docs quote RULE)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from kiln.compress.catalog import BASELINE
from kiln.core.latency import Timing

RULE = ("among the variants within {max_drop:g} points of fp32's val accuracy, the fastest (median round at batch "
        "{batch}) of those faster than fp32 in every interleaved timing round but at most one and by {min_speedup:g}x "
        "in the median round (each round's fp32 p50 over the variant's); fp32 if none is (a speed-up inside the timing "
        "noise is no reason to ship a compressed model)")


@dataclass(frozen=True)
class Selection:
    variant: str
    within_accuracy: list[str]  # variants close enough to fp32's accuracy (fp32 always is)
    robustly_faster: list[str]  # of those, the ones faster than fp32 beyond the noise
    rule: str

    def as_dict(self) -> dict:
        return asdict(self)


def within_accuracy(accuracy: Mapping[str, float], max_drop_points: float) -> list[str]:
    """Variants whose accuracy is at most `max_drop_points` (percentage points) below fp32's, which always qualifies."""
    return [name for name, value in accuracy.items()
            if name == BASELINE or (accuracy[BASELINE] - value) * 100 <= max_drop_points + 1e-9]


def round_speedups(fp32: Timing, variant: Timing) -> np.ndarray:
    """fp32's p50 over the variant's, round by round (both timed in each round, so a round's load hits both)."""
    return np.array(fp32.rounds_ms) / np.array(variant.rounds_ms)


def robustly_faster(fp32: Timing, variant: Timing, min_speedup: float) -> bool:
    """RULE's speed test: faster in all rounds but at most one (a load spike can hit one), and by `min_speedup` in the
    median round. A timing-order bias cannot pass it: rotation puts the variant first in its share of the rounds."""
    ratios = round_speedups(fp32, variant)
    return bool((ratios <= 1).sum() <= 1 and np.median(ratios) >= min_speedup)


def select_deployable(accuracy: Mapping[str, float], timings: Mapping[str, Timing], max_drop_points: float,
                      min_speedup: float) -> Selection:
    """Apply RULE to the variants' val accuracies and batched timings (the same keys, fp32 among them)."""
    close = within_accuracy(accuracy, max_drop_points)
    fp32 = timings[BASELINE]
    faster = [name for name in close if name != BASELINE and robustly_faster(fp32, timings[name], min_speedup)]
    variant = min(faster, key=lambda name: timings[name].median_ms) if faster else BASELINE
    rule = RULE.format(max_drop=max_drop_points, batch=fp32.batch_size, min_speedup=min_speedup)
    return Selection(variant, close, faster, rule)
