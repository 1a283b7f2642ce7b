"""The promotion gate's policy, as pure functions: every new version becomes `challenger`; it becomes `champion`
when there is none, or when it beats the champion on the same test items, by the gate metric's margin and
significantly by McNemar's test on the paired predictions. No MLflow here: kiln.evaluate.registry reads each
version's evidence from the registry and moves the aliases the decision names.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from kiln.core.params import Params
from kiln.evaluate.stats import mcnemar_exact


@dataclass(frozen=True)
class Gate:
    metric: str
    margin: float  # required improvement, in the metric's units
    alpha: float  # significance level of McNemar's test

    @classmethod
    def from_params(cls, params: Params) -> Gate:
        """The gate every registration passes (evaluate.gate_metric, gate_margin, gate_alpha)."""
        return cls(params.evaluate.gate_metric, params.evaluate.gate_margin, params.evaluate.gate_alpha)


@dataclass(frozen=True)
class Evidence:
    value: float  # the version's gate metric
    predictions: dict  # its test predictions, as predictions_record writes them


@dataclass
class Decision:
    version: str
    promoted: bool
    reason: str
    metric: str
    value: float
    margin: float
    alpha: float
    champion_version: str | None = None
    champion_value: float | None = None
    delta: float | None = None
    b: int | None = None  # test items only this version classifies correctly
    c: int | None = None  # test items only the champion classifies correctly
    p_value: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def split_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a test split's content, to check that two runs' predictions pair item by item."""
    digest = hashlib.sha256()
    for array in (images, labels):
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def predictions_record(images: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> dict:
    """What a registered version's run logs for the gate: labels and predicted classes, with the split's digest."""
    return {"split_sha256": split_digest(images, labels), "labels": labels.tolist(), "predicted": predicted.tolist()}


def first(gate: Gate, version: str, new: Evidence) -> Decision:
    """The decision for a version when there is no champion: it becomes one."""
    return Decision(version, True, "no champion yet", gate.metric, new.value, gate.margin, gate.alpha)


def judge(gate: Gate, version: str, new: Evidence, champion: str, old: Evidence) -> Decision:
    """Compare `version` with `champion` on the paired test predictions of each."""
    delta = round(new.value - old.value, 12)  # so that 0.58 - 0.57 reaches a 0.01 margin despite binary floating point
    decision = Decision(version, False, "", gate.metric, new.value, gate.margin, gate.alpha, champion, old.value, delta)
    record, record0 = new.predictions, old.predictions
    sizes = len(record["labels"]), len(record0["labels"])
    if sizes[0] != sizes[1]:
        decision.reason = f"champion v{champion} was tested on {sizes[1]} items, this version on {sizes[0]}"
        return decision
    if record["split_sha256"] != record0["split_sha256"]:
        decision.reason = f"champion v{champion} was tested on a different test split of the same size"
        return decision
    labels = np.asarray(record["labels"])
    test = mcnemar_exact(np.asarray(record["predicted"]) == labels, np.asarray(record0["predicted"]) == labels)
    decision.b, decision.c, decision.p_value = test.b, test.c, test.p_value
    stats = f"McNemar b={test.b} c={test.c} p={test.p_value:.4g}, alpha {gate.alpha}"
    if delta <= 0 or delta < gate.margin:
        decision.reason = f"{gate.metric} delta {delta:+.4f} does not reach the margin {gate.margin} ({stats})"
    elif test.p_value >= gate.alpha or test.b <= test.c:
        decision.reason = f"{gate.metric} delta {delta:+.4f} is not significant ({stats})"
    else:
        decision.promoted = True
        decision.reason = f"{gate.metric} delta {delta:+.4f} reaches the margin and is significant ({stats})"
    return decision
