"""A train run whose driver died (SIGKILL, the OOM killer, a lost machine) continues where it stopped when the stage
starts again on the same inputs.

The Ray Train run is named after a digest of those inputs (`run_name`), so Ray Train restores it from its latest
checkpoint in storage_path; the MLflow run the dead driver left RUNNING is picked up again, so its curves go on where
they stopped (`claim_run`). Once the stage has its model, `forget` removes the run's checkpoints: the same inputs then
train afresh (`dvc repro --force`). Drivers are identified by host and process id (tag kiln.driver): a RUNNING run
whose driver on this host is gone is finished as KILLED unless it is the one being resumed; runs of other hosts are
left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from typing import Any

import psutil
import pyarrow.fs
from mlflow import MlflowClient

KEY_TAG, DRIVER_TAG = "kiln.train_key", "kiln.driver"


def run_name(**inputs: Any) -> str:
    """`train-` and a digest of everything the trained weights depend on, given as JSON-able values."""
    return "train-" + hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def this_driver() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(driver: str) -> bool:
    host, _, pid = driver.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


def claim_run(client: MlflowClient, experiment_id: str, name: str) -> str | None:
    """The id of the RUNNING train run named `name` whose driver died on this host, now tagged with this driver; other
    RUNNING train runs of dead drivers on this host are set KILLED. None when there is nothing to resume."""
    resumed = None
    for run in client.search_runs([experiment_id], "tags.`kiln.stage` = 'train' and attributes.status = 'RUNNING'",
                                  order_by=["attributes.start_time DESC"]):
        if not _dead_here(run.data.tags.get(DRIVER_TAG, "")):
            continue
        if resumed is None and run.data.tags.get(KEY_TAG) == name:
            resumed = run.info.run_id
            client.set_tag(resumed, DRIVER_TAG, this_driver())
        else:
            client.set_terminated(run.info.run_id, "KILLED")
    return resumed


def forget(storage_uri: str, name: str) -> None:
    """Remove the checkpoints of the finished Ray Train run `name` under `storage_uri` (a folder or a cloud URI)."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage_uri)
    if filesystem.get_file_info(f"{root}/{name}").type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(f"{root}/{name}")
