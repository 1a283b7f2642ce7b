"""MLflow conventions: where runs go, and the lineage tags every run and model version carries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import requests
import yaml

from kiln.core.errors import InputError
from kiln.core.files import sha256_file
from kiln.core.params import Params, params_hash
from kiln.core.prepared import MANIFEST

STORE, ARTIFACTS = "mlflow.db", "mlartifacts"  # the embedded default: a sqlite store and its artifacts, side by side
# MLflow's HTTP retries, set deliberately: its defaults (7 retries, backoff factor 2, 120 s timeout) hang a stage for
# minutes on a dead server; these ride out a restart of ~30 s (waits of 1, 2, 4, 8, 16 s) and then fail.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else `mlflow.db` in the working directory as an absolute sqlite URI.

    Absolute, so Ray workers whose working directory differs still write to the same store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(STORE).resolve()}"


def require_server(uri: str) -> None:
    """Fail at once, naming `uri`, when it is a tracking server that does not answer its health check (MLflow's own
    retries would wait for it); a database URI is not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as error:
        raise InputError(f"MLFLOW_TRACKING_URI: the tracking server {uri} does not answer "
                         f"({type(error).__name__}); start it, or point MLFLOW_TRACKING_URI at one that runs") from None


def use_experiment(name: str) -> str:
    """Point the fluent API at the store and experiment, after checking that a tracking server answers and setting
    MLflow's HTTP retries (HTTP_RETRIES, unless the environment sets them); returns the tracking URI."""
    uri = tracking_uri()
    for key, value in HTTP_RETRIES.items():
        os.environ.setdefault(key, value)
    require_server(uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:///"):
        store = Path(uri.removeprefix("sqlite:///"))  # artifacts beside the store, wherever the run's cwd is
        mlflow.create_experiment(name, artifact_location=(store.parent / ARTIFACTS).resolve().as_uri())
    mlflow.set_experiment(name)
    return uri


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when tracked files are modified; 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_hash(prepared_dir: Path | str) -> str:
    """DVC's md5 of the prepared data from dvc.lock; the manifest's sha256 when DVC has not recorded it."""
    lock = Path("dvc.lock")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("prepare", {}).get("outs", []):
            if Path(out["path"]) == Path(prepared_dir):
                return f"md5:{out['md5']}"
    return f"sha256:{sha256_file(Path(prepared_dir) / MANIFEST)}"


def lineage_tags(params: Params, prepared_dir: Path | str) -> dict[str, str]:
    return {
        "kiln.git_commit": git_commit(),
        "kiln.data_hash": data_hash(prepared_dir),
        "kiln.params_hash": params_hash(params),
        "kiln.datasets": ",".join(params.task_weights),  # what the model learns from: a fine-tune target must differ
    }
