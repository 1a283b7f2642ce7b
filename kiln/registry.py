"""Model registry policy: every new version becomes `challenger`; `champion` moves only when it is beaten."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    version: str
    promoted: bool
    metric: str
    value: float
    champion_version: str | None
    champion_value: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def current_champion(client: MlflowClient, name: str, metric: str) -> tuple[str, float] | None:
    """(version, metric value) of the champion, or None when there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), client.get_run(version.run_id).data.metrics[metric]


def promote(client: MlflowClient, name: str, version: str, metric: str, value: float) -> Decision:
    """Alias `version` as challenger, and as champion if there is none or it is better on `metric`."""
    version = str(version)
    champion = current_champion(client, name, metric)
    promoted = champion is None or value > champion[1]
    client.set_registered_model_alias(name, CHALLENGER, version)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    return Decision(version, promoted, metric, value, *(champion or (None, None)))
