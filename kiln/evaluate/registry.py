"""The registry side of the promotion gate (its policy: kiln.evaluate.gate): each version's evidence read from the run
that registered it, and the aliases moved as the decision says. Everything is judged before any alias moves, so a
failure leaves the aliases as they were.

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
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kiln.core.errors import InputError
from kiln.evaluate.gate import Decision, Evidence, Gate, first, judge

CHAMPION, CHALLENGER = "champion", "challenger"
PREDICTIONS = "test_predictions.json"


class GateError(InputError):
    """The registry lacks what the gate needs (a metric, the paired predictions); nothing was moved."""


def _evidence(client: MlflowClient, name: str, version: str, metric: str) -> Evidence:
    """A version's gate metric and paired predictions, read from the run that logged them."""
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
        return Evidence(metrics[metric], json.loads(Path(path).read_text()))


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
            decision = (first(gate, version, new) if champion is None
                        else judge(gate, version, new, champion, _evidence(client, name, champion, gate.metric)))
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
