"""Model registry policy: every new version becomes `challenger`; `champion` moves only when the gate passes.

The gate pairs the test predictions each evaluate run logs (PREDICTIONS) with the champion's: the new version
must beat it on the gate metric by the margin, and McNemar's test on the paired predictions must be significant
in its favour. Everything is computed before any alias moves, so a failure leaves the aliases as they were.

Two evaluate runs may promote at once. MLflow has no compare-and-set on aliases, so on a sqlite store a file lock
for the database makes judge-and-move one step; on a server store, `promote` re-reads the champion just before
moving and judges again if it changed. What remains on a server: two promotions whose re-read and move fall within
the same few milliseconds can both move `champion`; each run's `kiln.promotion_reason` tag names the champion it
was compared with, so such a case shows in the records.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kiln.core.errors import InputError
from kiln.evaluate.stats import mcnemar_exact

CHAMPION, CHALLENGER = "champion", "challenger"
PREDICTIONS = "test_predictions.json"


class GateError(InputError):
    """The registry lacks what the gate needs (a metric, the paired predictions); nothing was moved."""


@dataclass(frozen=True)
class Gate:
    metric: str
    margin: float  # required improvement, in the metric's units
    alpha: float  # significance level of McNemar's test


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
    """What evaluate logs as PREDICTIONS: labels and predicted classes, with the digest of the split."""
    return {"split_sha256": split_digest(images, labels), "labels": labels.tolist(), "predicted": predicted.tolist()}


def _evidence(client: MlflowClient, name: str, version: str, metric: str) -> tuple[float, dict]:
    """(gate metric value, predictions record) of a version, read from the run that logged it."""
    run_id = client.get_model_version(name, version).run_id
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        raise GateError(f"{name} v{version} (run {run_id}) has no metric {metric!r} to compare on")
    with tempfile.TemporaryDirectory(prefix="kiln-gate-") as tmp:
        try:
            path = client.download_artifacts(run_id, PREDICTIONS, tmp)
        except MlflowException:
            raise GateError(
                f"{name} v{version} (run {run_id}) has no {PREDICTIONS} to pair with; re-evaluate it, or move "
                f"the '{CHAMPION}' alias by hand"
            ) from None
        return metrics[metric], json.loads(Path(path).read_text())


def _judge(gate: Gate, version: str, new: tuple[float, dict], champion: str, old: tuple[float, dict]) -> Decision:
    """Compare `version` with `champion`, each given as (gate metric value, predictions record)."""
    (value, record), (value0, record0) = new, old
    delta = round(value - value0, 12)  # so that 0.58 - 0.57 reaches a 0.01 margin despite binary floating point
    decision = Decision(version, False, "", gate.metric, value, gate.margin, gate.alpha, champion, value0, delta)
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
    if decision.delta <= 0 or decision.delta < gate.margin:
        decision.reason = f"{gate.metric} delta {decision.delta:+.4f} does not reach the margin {gate.margin} ({stats})"
    elif test.p_value >= gate.alpha or test.b <= test.c:
        decision.reason = f"{gate.metric} delta {decision.delta:+.4f} is not significant ({stats})"
    else:
        decision.promoted = True
        decision.reason = f"{gate.metric} delta {decision.delta:+.4f} reaches the margin and is significant ({stats})"
    return decision


def _move_aliases(client: MlflowClient, name: str, targets: dict[str, str]) -> None:
    """Point each alias at its version; if one fails, put back those already moved."""
    before = dict(client.get_registered_model(name).aliases)
    moved: list[str] = []
    try:
        for alias, version in targets.items():
            client.set_registered_model_alias(name, alias, version)
            moved.append(alias)
    except Exception:
        for alias in moved:
            if alias in before:
                client.set_registered_model_alias(name, alias, str(before[alias]))
            else:
                client.delete_registered_model_alias(name, alias)
        raise


@contextmanager
def registry_lock(client: MlflowClient) -> Iterator[None]:
    """Hold an exclusive file lock for a sqlite store's database (kiln keeps registry and tracking in one store), in
    the temp folder (a sqlite store serves one machine) so the checkout gains no file; a server store has none."""
    uri = client.tracking_uri
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = Path(uri.removeprefix("sqlite:///")).resolve()
    name = f"kiln-registry-{hashlib.sha256(str(database).encode()).hexdigest()[:16]}.lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _champion(client: MlflowClient, name: str) -> str | None:
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    return None if champion is None else str(champion)


def promote(client: MlflowClient, name: str, version: str, gate: Gate) -> Decision:
    """Alias `version` as challenger, and as champion if there is none or the gate passes; returns the decision."""
    version = str(version)
    new = _evidence(client, name, version, gate.metric)
    with registry_lock(client):
        while True:
            champion = _champion(client, name)
            if champion is None:
                decision = Decision(version, True, "no champion yet", gate.metric, new[0], gate.margin, gate.alpha)
            else:
                decision = _judge(gate, version, new, champion, _evidence(client, name, champion, gate.metric))
            if _champion(client, name) == champion:  # nobody moved it while we judged
                break
        _move_aliases(client, name, {CHALLENGER: version, **({CHAMPION: version} if decision.promoted else {})})
    return decision


def resolve_version(client: MlflowClient, name: str, reference: str) -> str:
    """The version `reference` (a version number or an alias) names; InputError naming the key when there is none."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise InputError(f"tracking.registered_model: the registry has no model {name!r}; run the pipeline "
                         "(`dvc repro evaluate`) to register one") from None
    if reference.isdigit():
        try:
            return str(client.get_model_version(name, reference).version)
        except MlflowException:
            raise InputError(f"finetune.base: {name} has no version {reference}") from None
    if reference not in model.aliases:
        aliases = ", ".join(sorted(model.aliases)) or "none"
        raise InputError(f"finetune.base: {name} has no alias {reference!r} (its aliases: {aliases})")
    return str(model.aliases[reference])
