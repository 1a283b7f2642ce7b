"""The promotion gate on a real MLflow registry (sqlite in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from kiln.registry import promote


@pytest.fixture
def client(tmp_path: Path) -> MlflowClient:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    return client


def new_version(client: MlflowClient, accuracy: float | None) -> str:
    run = client.create_run(client.create_experiment(f"e{len(client.search_experiments())}"))
    if accuracy is not None:
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version("m", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version)


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model("m").aliases.items()}


def test_champion_moves_only_when_beaten(client: MlflowClient) -> None:
    first = promote(client, "m", new_version(client, 0.90), "test_accuracy", 0.90)
    assert first.promoted and aliases(client) == {"champion": "1", "challenger": "1"}
    worse = promote(client, "m", new_version(client, 0.85), "test_accuracy", 0.85)
    assert not worse.promoted and worse.champion_value == 0.90
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    better = promote(client, "m", new_version(client, 0.95), "test_accuracy", 0.95)
    assert better.promoted and better.champion_version == "1"
    assert aliases(client) == {"champion": "3", "challenger": "3"}


def test_failed_gate_leaves_aliases_untouched(client: MlflowClient) -> None:
    promote(client, "m", new_version(client, None), "test_accuracy", 0.9)  # champion without the metric
    before = aliases(client)
    with pytest.raises(KeyError):
        promote(client, "m", new_version(client, 0.99), "test_accuracy", 0.99)
    assert aliases(client) == before
