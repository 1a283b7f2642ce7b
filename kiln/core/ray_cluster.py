"""Connecting to Ray (a local instance by default, the cluster in RAY_ADDRESS when set) and where Ray keeps runs."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from kiln.core.errors import InputError
from kiln.core.tracking import HTTP_RETRIES


def connect() -> None:
    """Start (or join) Ray once per process; quiet, no dashboard for the local case."""
    if ray.is_initialized():
        return
    # Ray Train's preemption watcher (early notice of a reclaimed spot node) is an actor whose start prints an
    # error-level "max_restarts > 0" line on every fit (ray-project/ray#53727). kiln restarts a worker group from
    # its checkpoints when a node goes away, notice or not; set the variable to 1 to have the watcher anyway.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Ray's own INFO lines (one per reported result on every Train worker) would bury kiln's progress lines.
    quiet = ray.LoggingConfig(log_level="WARNING")
    # Workers log to MLflow too: the same HTTP retries as this process (the environment's values win).
    retries = {"env_vars": {key: os.environ.get(key, value) for key, value in HTTP_RETRIES.items()}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, logging_config=quiet, runtime_env=retries)
    else:  # a new local instance, even when `ray start` left a cluster running on this machine
        ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_config=quiet,
                 runtime_env=retries)


def join(cpus: float, what: str) -> None:
    """Connect, and fail now, naming `what` (the params keys asking for them), if Ray can never give it `cpus`."""
    connect()
    require(cpus, what)


def require(needed: float, what: str, resource: str = "CPU") -> None:
    """Fail before scheduling anything if the cluster can never give `what` the `resource` (CPU, GPU) it needs."""
    available = ray.cluster_resources().get(resource, 0)
    if needed > available:
        raise InputError(f"{what} needs {needed:g} {resource}s but the Ray cluster has {available:g}")


def storage_uri(storage_path: str) -> str:
    """Where Ray Train and Ray Tune keep checkpoints: a cloud URI (`s3://...`) as given, a local folder made absolute
    (Ray needs one)."""
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())
