"""The train stage on the session's real two-node Ray cluster: placement, reproducibility, surviving a lost worker."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kiln.config import Params, apply_overrides, validate_params
from tasks import prepare
from tasks import train as train_stage
from tests.conftest import BIN, REPO, TINY_PARAMS

pytestmark = pytest.mark.slow


def tiny(**train: object) -> Params:
    return validate_params(apply_overrides(TINY_PARAMS, {"train.use_tuned": False,
                                                          **{f"train.{k}": v for k, v in train.items()}}))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepare.prepare(tiny().prepare, out)
    return out


def train_in(workdir: Path, params: Params, prepared: Path) -> dict[str, float]:
    return train_stage.run(params, prepared, workdir / "unused.json", workdir / "model.pt", workdir / "reports",
                           workdir / "ray_results")


def test_two_workers_on_two_nodes_reproduce_exactly(prepared: Path, tmp_path: Path, ray_address: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tiny(epochs=3, num_workers=2)
    first, second = (train_in(tmp_path / name, params, prepared) for name in ("first", "second"))
    assert first["worker_nodes"] == 2, "each 1-CPU node should host one of the two workers"
    first.pop("images_per_second"), second.pop("images_per_second")  # the one figure that depends on the clock
    assert first == second
    assert first["val_accuracy"] > 0.5


def read_history(path: Path) -> list[int]:
    with open(path, newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def test_training_survives_a_killed_worker(prepared: Path, tmp_path: Path, ray_address: str) -> None:
    """SIGKILL one Ray Train worker mid-run: the group restarts from the last epoch checkpoint and finishes."""
    epochs = 25
    params = apply_overrides(TINY_PARAMS, {"train.use_tuned": False, "train.epochs": epochs, "train.num_workers": 2,
                                           "train.max_failures": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared").symlink_to(prepared)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    stage = subprocess.Popen([sys.executable, "-m", "tasks", "train"], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    deadline = time.monotonic() + 300
    for line in stage.stdout:
        output.append(line)
        if f"train: epoch 3/{epochs}" in line:
            break
        assert time.monotonic() < deadline, "".join(output)
    workers = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    rest, _ = stage.communicate(timeout=600)
    output = "".join(output) + rest
    assert stage.returncode == 0, output[-6000:]
    resumed_after = int(re.search(r"train: resuming after epoch (\d+)", output).group(1))
    assert resumed_after >= 1, "the group restarted from scratch, not from a checkpoint"

    assert read_history(tmp_path / "reports/train/history.csv") == list(range(1, epochs + 1))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("kiln").experiment_id], "tags.`kiln.stage` = 'train'")[0]
    logged = sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.timestamp)
    steps = [metric.step for metric in logged]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    before, after = steps[:restart], steps[restart:]
    assert before == list(range(1, len(before) + 1)), "epochs before the kill"
    assert after == list(range(resumed_after + 1, epochs + 1)), "no epoch lost or repeated after the restart"
    assert before[-1] - resumed_after <= 2, "only the epochs after the last registered checkpoint are redone"
    assert run.data.metrics["val_accuracy"] > 0.5
