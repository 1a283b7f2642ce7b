"""The tune stage on the session's real two-node Ray cluster, with MLflow on sqlite in a temp dir."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from ray import tune

from kiln.core.errors import InputError
from kiln.core.params import Params, apply_overrides, validate_params
from kiln.platform.contract import stages
from kiln.tune.search import scheduler, search_algorithm, to_domain
from tasks import prepare
from tasks import tune as tune_stage
from tests.conftest import REPO, TINY_PARAMS, output_tail, record_measured, repo_env, until

pytestmark = pytest.mark.slow


def tiny(**overrides: object) -> Params:
    return validate_params(apply_overrides(TINY_PARAMS, {f"tune.{k}": v for k, v in overrides.items()}))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_address: str) -> Path:
    """A fresh working directory holding this test's MLflow store (sqlite) and artifacts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def run_stage(params: Params, prepared: Path, workdir: Path) -> dict:
    return tune_stage.run(params, prepared, workdir / "best_config.json", workdir / "reports")


def child_runs(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("kiln")
    return [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                            "tags.`kiln.stage` = 'tune-trial'", max_results=1000)


def test_domains_algorithms_and_schedulers() -> None:
    params = tiny(search="tpe", scheduler="asha")
    assert type(search_algorithm(params.tune, 0)).__name__ == "OptunaSearch"
    assert type(scheduler(params.tune, 0)).__name__ == "AsyncHyperBandScheduler"
    assert "LogUniform" in type(to_domain(params.tune.search_space["lr"]).sampler).__name__
    grid = tiny(search="grid", search_space={"lr": {"type": "grid", "values": [0.1, 0.2]}}).tune
    assert to_domain(grid.search_space["lr"]) == tune.grid_search([0.1, 0.2])
    assert type(search_algorithm(grid, 0)).__name__ == "BasicVariantGenerator"
    stepped = tiny(search_space={"batch_size": {"type": "qrandint", "low": 16, "high": 64, "q": 16}}).tune
    assert {to_domain(stepped.search_space["batch_size"]).sample() for _ in range(50)} <= {16, 32, 48, 64}


def test_tpe_asha_stops_weak_trials_across_nodes(prepared: Path, workdir: Path) -> None:
    params = tiny(search="tpe", scheduler="asha", num_samples=6, epochs=3, grace_period=1, reduction_factor=2)
    metrics = run_stage(params, prepared, workdir)

    trials = json.loads((workdir / "reports/trials.json").read_text())
    assert len(trials) == metrics["trials"] == 6
    states = [t["state"] for t in trials.values()]
    assert metrics["stopped_early_trials"] == states.count("stopped_early") >= 1
    assert metrics["trial_epochs"] == sum(t["epochs"] for t in trials.values()) < 6 * 3
    assert metrics["nodes"] == 2, "the two 1-CPU nodes should both have run trials"
    best = json.loads((workdir / "best_config.json").read_text())
    assert best["value"] == pytest.approx(max(t["val_accuracy"] for t in trials.values()))
    for plot in ("hyperparameters.png", "best_so_far.png"):
        assert (workdir / "reports" / plot).read_bytes()[:4] == b"\x89PNG"
    curve = (workdir / "reports/best_so_far.csv").read_text().splitlines()
    assert len(curve) == 1 + metrics["trial_epochs"]

    children = child_runs(workdir)
    assert len(children) == 6
    assert {c.info.status for c in children} == {"FINISHED"}
    assert sorted(c.data.tags["kiln.trial_state"] for c in children) == sorted(states)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {best["mlflow_run_id"]}
    stopped = next(c for c in children if c.data.tags["kiln.trial_state"] == "stopped_early")
    assert stopped.data.metrics["training_iteration"] < 3


def test_pbt_runs_its_population_to_the_end(prepared: Path, workdir: Path) -> None:
    params = tiny(search="grid", scheduler="pbt", num_samples=1, epochs=2, perturbation_interval=1,
                  search_space={"lr": {"type": "grid", "values": [0.03, 0.05, 0.08]}})
    metrics = run_stage(params, prepared, workdir)
    assert metrics["trials"] == 3 and metrics["failed_trials"] == metrics["stopped_early_trials"] == 0
    children = child_runs(workdir)
    assert [c.data.tags["kiln.trial_state"] for c in children] == ["completed"] * 3
    assert 0.03 * 0.8**2 <= json.loads((workdir / "best_config.json").read_text())["hyperparameters"]["lr"] <= 0.1


def test_a_diverging_trial_fails_alone(prepared: Path, workdir: Path) -> None:
    params = tiny(search="grid", scheduler="fifo", num_samples=1, epochs=1,
                  search_space={"lr": {"type": "grid", "values": [1000.0, 0.05]}})
    metrics = run_stage(params, prepared, workdir)
    assert metrics["trials"] == 2 and metrics["failed_trials"] == 1
    failed, finished = sorted(child_runs(workdir), key=lambda c: c.info.status)
    assert (failed.info.status, failed.data.tags["kiln.trial_state"], failed.data.params["lr"]) == (
        "FAILED", "failed", "1000.0")
    assert finished.info.status == "FINISHED"
    assert json.loads((workdir / "best_config.json").read_text())["hyperparameters"]["lr"] == 0.05


def test_the_same_trial_config_gives_the_same_result(prepared: Path, workdir: Path) -> None:
    """A trial's result is a function of its config and seed, not of what its reused worker process ran before:
    the grid, run twice, scores each point twice alike."""
    params = tiny(search="grid", scheduler="fifo", num_samples=2, epochs=1,
                  search_space={"lr": {"type": "grid", "values": [0.05, 0.1]}})
    run_stage(params, prepared, workdir)
    scores: dict[str, set[float]] = {}
    for run in child_runs(workdir):
        scores.setdefault(run.data.params["lr"], set()).add(run.data.metrics["val_accuracy"])
    assert scores.keys() == {"0.05", "0.1"} and all(len(values) == 1 for values in scores.values()), scores


def test_trials_can_be_multi_worker_ray_train_runs(prepared: Path, workdir: Path) -> None:
    params = tiny(search="grid", scheduler="fifo", num_samples=1, epochs=1, workers_per_trial=2,
                  search_space={"lr": {"type": "grid", "values": [0.05, 0.1]}})
    metrics = run_stage(params, prepared, workdir)
    assert metrics["trials"] == 2 and metrics["failed_trials"] == 0
    assert {c.data.tags["kiln.trial_state"] for c in child_runs(workdir)} == {"completed"}


@pytest.mark.fault
def test_interrupted_stage_resumes_its_experiment(tmp_path: Path, ray_address: str,
                                                 request: pytest.FixtureRequest) -> None:
    """SIGINT the stage CLI after the first trial finishes; the re-run finishes the rest under the same parent."""
    params = apply_overrides(TINY_PARAMS, {"tune.num_samples": 4, "tune.epochs": 3, "tune.cpus_per_trial": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.run(validate_params(params), tmp_path / "data/prepared")
    env = {**repo_env(), "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    child_runs(tmp_path)  # creates the store's tables now, not while the stage creates them too
    command = [sys.executable, *shlex.split(stages(REPO)["tune"].cmd)[1:]]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    until(lambda: "FINISHED" in {c.info.status for c in child_runs(tmp_path)}, 300, lambda: output_tail(first), first,
          every=1)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    done_before = {c.data.tags["trial_name"] for c in child_runs(tmp_path) if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 4
    assert not (tmp_path / "models/best_config.json").exists()

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    reused = re.search(r"^tune: reusing (\d+) ended trials of .*; the other trials continue$", second.stdout, re.M)
    assert reused and int(reused[1]) >= len(done_before), second.stdout[-4000:]
    assert "Trial status" not in second.stdout, "one line per finished trial, not Ray's status tables"
    assert len(re.findall(r"^tune: trial \d+/4 completed after 3 epochs: lr=", second.stdout, re.M)) == 4 - len(
        done_before)
    children = child_runs(tmp_path)
    record_measured(request.node, runs_left_running=sum(c.info.status == "RUNNING" for c in children))
    assert all(c.info.status in ("FINISHED", "KILLED") for c in children)
    finished = [c.data.tags["trial_name"] for c in children if c.info.status == "FINISHED"]
    assert sorted(set(finished)) == sorted(finished), "a finished trial was run again"
    assert len(finished) == 4 and done_before <= set(finished)
    best = json.loads((tmp_path / "models/best_config.json").read_text())
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {best["mlflow_run_id"]}


@pytest.mark.bad_input
def test_a_trial_bigger_than_the_cluster_fails_before_any_trial(prepared: Path, workdir: Path) -> None:
    params = tiny(cpus_per_trial=1, workers_per_trial=3)  # RAY_ADDRESS is set: checked against the real cluster
    with pytest.raises(InputError, match="a tune trial needs 3 CPUs but the Ray cluster has 2"):
        run_stage(params, prepared, workdir)
    assert not (workdir / "best_config.json").exists() and not (workdir / "ray_results").exists()
    assert child_runs(workdir) == []
