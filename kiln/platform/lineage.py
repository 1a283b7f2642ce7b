"""The lineage of a registered model version: which DVC experiment (git ref and commit, with params.yaml and
dvc.lock) produced it, recorded on the version and its run so that `kiln reproduce` can rebuild it.

A pipeline run names its experiment before it starts (kiln.evaluate.publish.EXPERIMENT_ENV), so every version it
registers carries the name from the start; when the run ends, finished or failed, it saves the experiment and
`record_experiment` completes the lineage of those versions.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from kiln.core.tracking import tracking_uri
from kiln.platform.contract import stages
from kiln.platform.workspace import Experiment

EXPERIMENT_TAGS = ("kiln.experiment", "kiln.experiment_ref", "kiln.experiment_commit", "kiln.git_remote")
REGISTERING_STAGES = ("evaluate", "finetune")  # the stages whose registration.json names a version


def registered_by(workspace: Path, name: str) -> list[ModelVersion]:
    """The versions the run named `name` registered in `workspace`."""
    client, found = MlflowClient(tracking_uri()), []
    for stage in REGISTERING_STAGES:
        path = workspace / stages(workspace)[stage].output("registration.json")
        if path.is_file():
            registration = json.loads(path.read_text())
            model, version = registration["registered_model"], str(registration["version"])
            try:
                registered = client.get_model_version(model, version)
            except MlflowException:  # a registration of another store's: not this run's
                continue
            if registered.tags.get("kiln.experiment") == name:
                found.append(registered)
    return found


def record_experiment(workspace: Path, experiment: Experiment) -> list[str]:
    """Tag each version the experiment's run registered, and the version's run, with the experiment (its commit as
    `kiln.git_commit` too), and log the run's params.yaml and dvc.lock to that run under `lineage/`; returns the
    versions as `NAME vN`."""
    client = MlflowClient(tracking_uri())
    tags = {**dict(zip(EXPERIMENT_TAGS, (experiment.name, experiment.ref, experiment.commit, experiment.remote),
                       strict=True)), "kiln.git_commit": experiment.commit}
    versions = registered_by(workspace, experiment.name)
    for version in versions:
        for key, value in tags.items():
            client.set_model_version_tag(version.name, version.version, key, value)
            client.set_tag(version.run_id, key, value)
        for file in ("params.yaml", "dvc.lock"):
            client.log_artifact(version.run_id, str(workspace / file), "lineage")
    return [f"{version.name} v{version.version}" for version in versions]
