"""MLflow conventions: where runs go, and the lineage tags every run and model version carries."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow
import yaml

from kiln.core.files import sha256_file
from kiln.core.params import Params, params_hash
from kiln.core.prepared import MANIFEST

STORE, ARTIFACTS = "mlflow.db", "mlartifacts"  # the embedded default: a sqlite store and its artifacts, side by side


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else `mlflow.db` in the working directory as an absolute sqlite URI.

    Absolute, so Ray workers whose working directory differs still write to the same store.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(STORE).resolve()}"


def use_experiment(name: str) -> str:
    """Point the fluent API at the store and experiment; returns the tracking URI."""
    uri = tracking_uri()
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
    }
