"""The lineage of a registered model version: which DVC experiment (git ref and commit, with params.yaml and
dvc.lock) produced it, recorded on the version and its run so that `kiln reproduce` can rebuild it."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from kiln.core.contract import stages
from kiln.core.tracking import tracking_uri
from kiln.platform.workspace import Experiment

EXPERIMENT_TAGS = ("kiln.experiment", "kiln.experiment_ref", "kiln.experiment_commit", "kiln.git_remote")


def record_experiment(workspace: Path, experiment: Experiment) -> str:
    """Tag the version that evaluate registered in `workspace` (its registration.json) and the version's run with the
    experiment, and log the run's params.yaml and dvc.lock to that run under `lineage/`; returns the version."""
    registration = json.loads((workspace / stages(workspace)["evaluate"].output("registration.json")).read_text())
    client = MlflowClient(tracking_uri())
    name, version = registration["registered_model"], str(registration["version"])
    tags = dict(zip(EXPERIMENT_TAGS, (experiment.name, experiment.ref, experiment.commit, experiment.remote),
                    strict=True))
    run_id = client.get_model_version(name, version).run_id
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
        client.set_tag(run_id, key, value)
    for file in ("params.yaml", "dvc.lock"):
        client.log_artifact(run_id, str(workspace / file), "lineage")
    return version
