"""The train stage's driver is SIGKILLed mid-run (as the OOM killer would): what DVC had is intact, and `dvc repro`
resumes the killed run after its last checkpointed epoch, in the same MLflow run, ending where an uninterrupted run
on the same inputs ends."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient

from kiln.platform.contract import stage_path
from tests.conftest import BIN, TINY_PARAMS, copy_run, printed, record_measured, repo_env, run, until

pytestmark = [pytest.mark.fault, pytest.mark.slow]
EPOCHS = 10


def stage_process(dvc: subprocess.Popen) -> psutil.Process:
    """The `python -m tasks train` process under `dvc repro`."""
    return until(lambda: next((child for child in psutil.Process(dvc.pid).children(recursive=True)
                               if child.cmdline()[1:4] == ["-m", "tasks", "train"]), None),
                 60, "no train stage process under dvc repro", every=0.2)


def train_runs(repo: Path) -> list:
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(TINY_PARAMS["tracking"]["experiment"]).experiment_id
    return client.search_runs([experiment], "tags.`kiln.stage` = 'train'")


def test_a_killed_train_driver_resumes_where_it_stopped(reproduced: Path, tmp_path: Path, ray_address: str,
                                                        request: pytest.FixtureRequest) -> None:
    repo = copy_run(reproduced, tmp_path / "repo")
    run([str(BIN / "dvc"), "repro"], cwd=repo)  # the previous, good outputs (the session's run: nothing to do)
    lock = (repo / "dvc.lock").read_text()
    model = stage_path("train", "model", repo)
    recorded = next(out["md5"] for out in yaml.safe_load(lock)["stages"]["train"]["outs"]
                    if out["path"] == str(model.relative_to(repo)))
    params = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "epochs": EPOCHS}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    log = tmp_path / "killed.log"
    with log.open("w") as out:
        killed = subprocess.Popen([str(BIN / "dvc"), "repro", "train"], cwd=repo, env={**repo_env(),
                                  "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        printed(log, f"train: epoch 5/{EPOCHS}", killed)  # Ray keeps a checkpoint an epoch or two later
        stage_process(killed).kill()
        assert killed.wait(timeout=120) != 0
    finally:
        if killed.poll() is None:
            killed.kill()
    lock_kept = (repo / "dvc.lock").read_text() == lock
    run([str(BIN / "dvc"), "checkout", str(model.relative_to(repo))], cwd=repo)
    model_kept = run(["md5sum", str(model)], cwd=repo).stdout.split()[0] == recorded
    record_measured(request.node, outputs_lost=(not lock_kept) + (not model_kept))
    assert lock_kept, "a killed stage changed dvc.lock"
    assert model_kept, "the previous model is not intact"
    assert [r.info.status for r in train_runs(repo) if r.data.params.get("epochs") == str(EPOCHS)] == ["RUNNING"]

    resumed = run([str(BIN / "dvc"), "repro", "train"], cwd=repo).stdout
    epoch = int(resumed.split("train: resuming after epoch ")[1].split()[0])
    assert 1 <= epoch < EPOCHS and f"train: epoch {epoch}/{EPOCHS}" not in resumed, resumed[-4000:]
    assert f"train: epoch {epoch + 1}/{EPOCHS}" in resumed and f"train: epoch 1/{EPOCHS}" not in resumed
    (taken,) = [r for r in train_runs(repo) if r.data.params.get("epochs") == str(EPOCHS)]
    left_running = [r for r in train_runs(repo) if r.info.status == "RUNNING"]
    record_measured(request.node, runs_left_running=len(left_running))
    assert taken.info.status == "FINISHED" and not left_running
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    steps = {metric.step for metric in client.get_metric_history(taken.info.run_id, "val_accuracy")}
    assert steps == set(range(1, EPOCHS + 1)), f"epochs logged in the resumed run: {sorted(steps)}"
    metrics = stage_path("train", "reports", repo) / "metrics.json"
    after_resume = json.loads(metrics.read_text())

    again = run([str(BIN / "dvc"), "repro", "--force", "--single-item", "train"], cwd=repo).stdout
    assert "resuming" not in again and f"train: epoch 1/{EPOCHS}" in again, "a finished run's checkpoints were kept"
    uninterrupted = json.loads(metrics.read_text())
    timing = {"images_per_second"}
    assert {k: v for k, v in after_resume.items() if k not in timing} == (
        {k: v for k, v in uninterrupted.items() if k not in timing})
