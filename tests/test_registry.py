"""The promotion gate on a real MLflow registry (sqlite in a temp dir): evidence read from the versions' runs, aliases
moved, or left as they were when anything fails (the policy itself: test_gate)."""

from __future__ import annotations

import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from kiln.core.errors import InputError
from kiln.evaluate.gate import Gate, predictions_record
from kiln.evaluate.registry import PREDICTIONS, GateError, promote
from kiln.platform.reproduce import lineage_of

LABELS = np.arange(100) % 10
IMAGES = np.zeros((100, 1, 2, 2), np.uint8)
GATE = Gate("test_accuracy", margin=0.0, alpha=0.05)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its schema, made once: creating the schema takes seconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_registered_models()
    return path


@pytest.fixture
def client(tmp_path: Path, empty_store: Path) -> MlflowClient:
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("m")
    return client


def predictions(wrong: range, labels: np.ndarray = LABELS) -> np.ndarray:
    """Predictions that get exactly the items in `wrong` wrong."""
    predicted = labels.copy()
    predicted[list(wrong)] = (labels[list(wrong)] + 1) % 10
    return predicted


def new_version(client: MlflowClient, wrong: range | None, images: np.ndarray = IMAGES) -> str:
    """A model version whose run logged its accuracy and paired predictions (none when `wrong` is None)."""
    run_id = client.create_run(client.get_experiment_by_name("e").experiment_id).info.run_id
    labels = LABELS[: len(images)]
    if wrong is not None:
        predicted = predictions(wrong, labels)
        client.log_metric(run_id, "test_accuracy", float((predicted == labels).mean()))
        client.log_dict(run_id, predictions_record(images, labels, predicted), PREDICTIONS)
    else:
        client.log_metric(run_id, "test_accuracy", 0.5)
    client.set_terminated(run_id)
    return str(client.create_model_version("m", f"runs:/{run_id}/model", run_id=run_id).version)


def aliases(client: MlflowClient) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model("m").aliases.items()}


def test_first_version_becomes_champion(client: MlflowClient) -> None:
    decision = promote(client, "m", new_version(client, range(10)), GATE)
    assert decision.promoted and decision.reason == "no champion yet" and decision.p_value is None
    assert aliases(client) == {"champion": "1", "challenger": "1"}


def test_better_and_significant_becomes_champion(client: MlflowClient) -> None:
    promote(client, "m", new_version(client, range(20)), GATE)
    decision = promote(client, "m", new_version(client, range(15, 22)), GATE)  # b=15, c=2
    assert decision.promoted and (decision.b, decision.c) == (15, 2) and decision.p_value < 0.01
    assert (decision.champion_version, decision.champion_value, decision.value) == ("1", 0.80, 0.93)
    assert aliases(client) == {"champion": "2", "challenger": "2"}
    worse = promote(client, "m", new_version(client, range(20)), GATE)
    assert not worse.promoted and worse.delta == -0.13
    assert aliases(client) == {"champion": "2", "challenger": "3"}


def test_failed_gate_leaves_aliases_untouched(client: MlflowClient) -> None:
    promote(client, "m", new_version(client, range(20)), GATE)
    client.set_registered_model_alias("m", "champion", new_version(client, None))  # no predictions to pair with
    before = aliases(client)
    with pytest.raises(GateError, match=f"m v2 .* has no {PREDICTIONS}"):
        promote(client, "m", new_version(client, range(0)), GATE)
    assert aliases(client) == before


class FailingChampionAlias(MlflowClient):
    """A real client whose champion alias cannot be set, as when the registry goes away mid-way."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if alias == "champion":
            raise ConnectionError("registry unreachable")
        super().set_registered_model_alias(name, alias, version)


@pytest.mark.fault
def test_failure_while_moving_aliases_restores_them(client: MlflowClient, tmp_path: Path) -> None:
    promote(client, "m", new_version(client, range(20)), GATE)
    better = new_version(client, range(0))
    with pytest.raises(ConnectionError):
        promote(FailingChampionAlias(f"sqlite:///{tmp_path / 'mlflow.db'}"), "m", better, GATE)
    assert aliases(client) == {"champion": "1", "challenger": "1"}


class SlowClient(MlflowClient):
    """A real client that takes half a second to fetch evidence and to move an alias, widening the window in which
    two promotions can interleave."""

    def download_artifacts(self, *args, **kwargs) -> str:
        time.sleep(0.5)
        return super().download_artifacts(*args, **kwargs)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        time.sleep(0.5)
        super().set_registered_model_alias(name, alias, version)


@pytest.mark.fault
def test_two_promotions_at_once_end_where_the_decisions_say(client: MlflowClient, tmp_path: Path) -> None:
    """v2 and v3 both beat champion v1, and v3 beats v2: whichever order they serialise in, v3 ends as champion, and
    every logged decision was taken against the champion of its time."""
    promote(client, "m", new_version(client, range(20)), GATE)
    versions = new_version(client, range(10)), new_version(client, range(0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with ThreadPoolExecutor(2) as pool:
        decisions = list(pool.map(lambda version: promote(SlowClient(uri), "m", version, GATE), versions))
    assert aliases(client)["champion"] == "3"
    first, second = sorted(decisions, key=lambda decision: decision.champion_version)
    assert first.champion_version == "1" and first.promoted
    assert second.champion_version == first.version, "the second promotion was judged against a stale champion"
    assert aliases(client)["challenger"] == second.version


@pytest.mark.bad_input
@pytest.mark.parametrize(("tags", "expected"), [
    ({}, r"names no experiment: it was registered by a bare `dvc repro` or a stage command"),
    ({"kiln.experiment": "run-1"}, r"registered by the run of experiment run-1, which ended before saving it"),
    ({"kiln.experiment": "run-1", "kiln.experiment_ref": "refs/exps/ab/cdef/run-1", "kiln.git_remote": "{repo}"},
     r"its experiment refs/exps/ab/cdef/run-1 is not in .*repo: the `dvc exp run` that registered it did not finish"),
], ids=["no experiment", "experiment never saved", "ref not in the repository"])
def test_reproduce_names_what_a_version_lacks_before_any_work(client: MlflowClient, tmp_path: Path,
                                                               tags: dict[str, str], expected: str) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    version = new_version(client, range(0))
    for key, value in tags.items():
        client.set_model_version_tag("m", version, key, value.format(repo=tmp_path / "repo"))
    with pytest.raises(InputError, match=expected):
        lineage_of(f"models:/m/{version}", client)
