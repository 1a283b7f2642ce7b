"""The train stage on the session's real two-node Ray cluster: placement, reproducibility, surviving a lost worker."""

from __future__ import annotations

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from kiln.core.errors import InputError
from kiln.core.models import load_trained_model
from kiln.core.params import Params, apply_overrides, validate_params
from kiln.core.prepared import load_split
from kiln.platform.contract import stages
from kiln.platform.stack import Stack, stack_pids
from kiln.train.loop import VAL_BATCH, validate
from kiln.train.recipe import make_loader
from tasks import train as train_stage
from tests.conftest import REPO, TINY_PARAMS, repo_env

pytestmark = pytest.mark.slow


def tiny(**train: object) -> Params:
    return validate_params(apply_overrides(TINY_PARAMS, {"train.use_tuned": False,
                                                          **{f"train.{k}": v for k, v in train.items()}}))


def train_in(workdir: Path, params: Params, prepared: Path) -> dict[str, float]:
    return train_stage.run(params, prepared, workdir / "unused.json", workdir / "model.pt", workdir / "reports")


# Every part of the recipe at once, so one pair of Ray Train runs covers them all.
FULL_RECIPE = dict(model="compact", optimizer="adamw", lr=0.01, schedule="onecycle", label_smoothing=0.1,
                   dropout=0.1, augmentation={"digits": {"crop_padding": 1, "rotation": 10, "erasing": 0.2}},
                   adversarial={"method": "fgsm", "epsilon": 0.05, "ratio": 0.25})


def test_two_workers_on_two_nodes_reproduce_exactly(prepared: Path, tmp_path: Path, ray_address: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = tiny(epochs=4, num_workers=2, **FULL_RECIPE)
    first, second = (train_in(tmp_path / name, params, prepared) for name in ("first", "second"))
    assert first["worker_nodes"] == 2, "each 1-CPU node should host one of the two workers"
    first.pop("images_per_second"), second.pop("images_per_second")  # the one figure that depends on the clock
    assert first == second
    assert first["val_accuracy"] > 0.7
    lrs = [float(row["lr"]) for row in read_rows(tmp_path / "first/reports/history.csv")]
    assert lrs[0] > lrs[-1] and lrs[-1] < 0.01 * 0.05, "one-cycle anneals the rate towards zero"


def test_early_stopping_keeps_the_best_epoch_and_checkpoints_go_to_a_uri(
        prepared: Path, tmp_path: Path, ray_address: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = tmp_path / "checkpoints"
    params = tiny(epochs=6, num_workers=2, storage_path=storage.as_uri(),  # file:// goes through Ray's URI path
                  early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 10.0})  # no gain is that big
    final = train_in(tmp_path, params, prepared)
    assert read_history(tmp_path / "reports/history.csv") == [1, 2, 3], "stops after 2 epochs without gain"
    assert final["epoch"] == 1, "keeps the weights of the best epoch, the first"
    assert storage.is_dir() and not list(storage.glob("train-*")), (  # Ray made the folder; kiln.train.resume.forget
        "the finished run's checkpoints went under the storage URI and were removed from there")
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("kiln").experiment_id])[0]
    assert run.data.metrics["kept_epoch"] == 1
    model, _ = load_trained_model(str(tmp_path / "model.pt"))
    val = validate(model, make_loader(*load_split(prepared, "val"), VAL_BATCH, False, 0))
    losses = [float(row["val_loss"]) for row in read_rows(tmp_path / "reports/history.csv")]
    assert val.loss == pytest.approx(losses[0], rel=1e-5) and val.loss != pytest.approx(losses[-1], rel=1e-5)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def read_history(path: Path) -> list[int]:
    return [int(row["epoch"]) for row in read_rows(path)]


def train_workers(stack: Stack) -> list[int]:
    """PIDs of the Ray Train workers on the session's stack (none of another Ray on this machine)."""
    workers = []
    for pid in stack_pids(stack.root):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                workers.append(pid)
        except OSError:  # ended since it was listed
            continue
    return workers


@pytest.mark.fault
def test_training_survives_a_killed_worker(prepared: Path, tmp_path: Path, stack: Stack,
                                          ray_address: str) -> None:
    """SIGKILL one Ray Train worker mid-run: the group restarts from the last epoch checkpoint and finishes."""
    epochs = 12  # the kill comes right after epoch 3, with ~10 s of training left
    params = apply_overrides(TINY_PARAMS, {"train.use_tuned": False, "train.epochs": epochs, "train.num_workers": 2,
                                           "train.max_failures": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data").mkdir()
    (tmp_path / "data/prepared").symlink_to(prepared)
    env = {**repo_env(), "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    command = [sys.executable, *shlex.split(stages(REPO)["train"].cmd)[1:]]
    stage = subprocess.Popen(command, cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = []
    deadline = time.monotonic() + 300
    for line in stage.stdout:
        output.append(line)
        if f"train: epoch 3/{epochs}" in line:
            break
        assert time.monotonic() < deadline, "".join(output)
    workers = train_workers(stack)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
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


@pytest.mark.bad_input
def test_gpu_training_on_a_cluster_without_gpus_fails_before_any_work(prepared: Path, tmp_path: Path,
                                                                      ray_address: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(InputError, match=r"^train\.use_gpu \(one GPU per worker\) needs 2 GPUs but the Ray cluster "
                                         r"has 0$"):
        train_in(tmp_path, tiny(use_gpu=True), prepared)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "reports").exists()
