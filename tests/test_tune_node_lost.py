"""A Ray node lost mid-tune, on a two-node cluster of this test's own (not the session's shared one): the tune stage
completes, the trial that ran on the lost node restarts from its last epoch checkpoint on the node that is left
(Tune's FailureConfig, from train.max_failures), in the same MLflow run, and no trial run is left RUNNING."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kiln.core.params import apply_overrides, validate_params
from kiln.platform import processes, raynodes
from kiln.platform.contract import stages
from tasks import prepare
from tests.conftest import REPO, TINY_PARAMS, output_tail, record_measured, repo_env, until

pytestmark = [pytest.mark.fault, pytest.mark.slow]
HOST = "127.0.0.1"
EPOCHS = 30


def node(root: Path, name: str, head_address: str | None) -> tuple[int, str]:
    """Start a 1-CPU Ray node (the head when `head_address` is None) in a session of its own; its session id and the
    head's address."""
    names = raynodes.HEAD_PORTS if head_address is None else raynodes.NODE_PORTS
    ports = {port: processes.free_port(HOST) for port in names}
    command = raynodes.node_command(root, HOST, ports, 1, head_address)
    env = {**os.environ, **raynodes.SHUTDOWN_ENV}
    env.pop("RAY_ADDRESS", None)
    pid = processes.spawn(root, name, command, env, root)
    if head_address is None:
        processes.wait_for(root, name, lambda: processes.listening(HOST, ports["gcs"]), "its GCS listening")
        return pid, f"{HOST}:{ports['gcs']}"
    return pid, head_address


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A head and a second node, 1 CPU each; yields the head's address and the second node's session id."""
    root = tmp_path / "cluster"
    try:
        _, address = node(root, "ray-head", None)
        second, _ = node(root, "ray-node-1", address)
        raynodes.wait_for_nodes(address, 2, {**os.environ, "RAY_ADDRESS": address})
        yield address, second
    finally:
        for name in ("ray-node-1", "ray-head"):
            processes.stop(root, name, grace=5)
        processes.sweep(root)


def trial_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("kiln")
    return [] if experiment is None else client.search_runs(
        [experiment.experiment_id], "tags.`kiln.stage` = 'tune-trial'", max_results=100)


def epochs_logged(client: MlflowClient, run_id: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, "val_accuracy")})


def test_a_lost_node_costs_its_trial_a_restart_from_its_last_checkpoint(
        tmp_path: Path, two_nodes: tuple[str, int], request: pytest.FixtureRequest) -> None:
    address, second_node = two_nodes
    params = apply_overrides(TINY_PARAMS, {  # two 1-CPU trials at once, one on each node, slow enough to kill mid-way
        "tune.num_samples": 2, "tune.epochs": EPOCHS, "tune.max_train_samples": 1000, "train.batch_size": 4,
        "tune.search_space": {"lr": {"type": "loguniform", "low": 0.002, "high": 0.01}}, "train.max_failures": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.run(validate_params(params), tmp_path / "data/prepared")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    trial_runs(client)  # creates the store's tables now, not while the stage creates them too
    env = {**repo_env(), "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store, "RAY_ADDRESS": address}
    command = [sys.executable, *shlex.split(stages(REPO)["tune"].cmd)[1:]]
    stage = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)

    def both_trials_past_epoch_3() -> bool:
        runs = trial_runs(client)
        return len(runs) == 2 and min(len(epochs_logged(client, r.info.run_id)) for r in runs) >= 3

    until(both_trials_past_epoch_3, 300, lambda: output_tail(stage), stage)
    for pid in processes.session(second_node):  # the second node's raylet, its workers and its `ray start`
        os.kill(pid, signal.SIGKILL)

    output, _ = stage.communicate(timeout=600)
    assert stage.returncode == 0, output[-4000:]
    died_after = [int(n) for n in re.findall(r"^tune: a trial's process died after (\d+) epochs", output, re.M)]
    assert len(died_after) == 1, output[-4000:]
    assert len(re.findall(rf"^tune: trial \d/2 completed after {EPOCHS} epochs", output, re.M)) == 2, output[-4000:]
    runs = trial_runs(client)
    record_measured(request.node, runs_left_running=sum(r.info.status == "RUNNING" for r in runs))
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, "a trial run was left RUNNING"
    restarted = [r for r in runs if r.data.tags.get("kiln.trial_restarts")]
    assert [r.data.tags["kiln.trial_restarts"] for r in restarted] == ["1"]
    redone = len(client.get_metric_history(restarted[0].info.run_id, "val_accuracy")) - EPOCHS
    assert 0 <= redone < died_after[0], f"{redone} epochs trained twice: it restarted from scratch, not a checkpoint"
    assert all(epochs_logged(client, r.info.run_id) == list(range(1, EPOCHS + 1)) for r in runs)
    best = json.loads((tmp_path / "models/best_config.json").read_text())
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {best["mlflow_run_id"]}
