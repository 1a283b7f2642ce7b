"""The kiln Prefect flow: the dvc.yaml stages brought up to date in DAG order, one Prefect task per stage, DVC deciding
what is stale, in a workspace of the flow run's own, recorded as a DVC experiment.

`workspace="clone"` (the `local` deployment, `kiln flow`): the run clones the checkout it starts in (HEAD plus its
uncommitted changes to tracked files) into a temporary workspace sharing the checkout's DVC cache and MLflow store;
the checkout itself is never edited. `workspace="here"`: the run works where the deployment's pull steps put it (a
fresh `git_clone`, `dvc pull`ed from the team's remote). Either way the run applies its overrides to params.yaml,
runs `dvc repro --single-item STAGE` per stage (a stage whose inputs DVC has seen is restored from the run-cache),
saves the result as the DVC experiment named after the flow run, pushes it (git ref to `origin`; outputs and
run-cache to the DVC remote when the cache is not shared), and records the experiment on the model versions the run
registered. A run that fails after a registration still saves, pushes and records what finished, so no version
(and no champion) is left without a rebuildable past.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from kiln.core.errors import InputError
from kiln.core.params import load_params
from kiln.core.tracking import tracking_uri
from kiln.evaluate.publish import EXPERIMENT_ENV
from kiln.platform import shell
from kiln.platform.contract import stages
from kiln.platform.lineage import record_experiment
from kiln.platform.overrides import write_overrides
from kiln.platform.summary import RAN, markdown, stage_statuses
from kiln.platform.workspace import Experiment, clone_workspace, push_experiment, require_tracked_data, save_experiment

TOP_TRIALS = 5
PARAMS_FILE = "params.yaml"


@task(task_run_name="{stage}")
def run_stage(stage: str, workspace: Path, pull: bool, experiment: str) -> str:
    """`dvc repro --single-item STAGE` in the workspace, its output in the Prefect log; returns what DVC did. The
    versions it registers name `experiment`, what the run is saved as."""
    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", *(["--pull"] if pull else []), stage]
    env = {**os.environ, EXPERIMENT_ENV: experiment}
    code, output = shell.stream(command, echo=logger.info, cwd=workspace, env=env)
    if code != 0:
        raise RuntimeError(f"stage {stage!r} failed: `{' '.join(command)}` exited {code}")
    return stage_statuses(output).get(stage, (RAN, None))[0]


@task
def open_workspace(mode: str, source: Path) -> Path:
    """A fresh clone of `source` (mode `clone`) or `source` itself (mode `here`), with its DVC-tracked inputs."""
    workspace = source
    if mode == "clone":
        workspace = Path(tempfile.mkdtemp(prefix="kiln-run-")) / "workspace"
        clone_workspace(source, workspace)
        get_run_logger().info(f"workspace: {workspace} (a clone of {source}, sharing its DVC cache)")
    require_tracked_data(workspace)
    return workspace


@task
def record(workspace: Path, name: str, shared_cache: bool) -> Experiment:
    """Save and push the run (what finished of it) as a DVC experiment; tag the model versions it registered."""
    experiment = push_experiment(workspace, save_experiment(workspace, name), with_data=not shared_cache)
    versions = ", ".join(record_experiment(workspace, experiment))
    get_run_logger().info(f"experiment {name}: {experiment.ref} ({experiment.commit[:10]}) pushed to "
                          f"{experiment.remote}, recorded on {versions or 'no version'}; `dvc exp apply {name}` brings "
                          "it into a checkout")
    return experiment


def top_trials(workspace: Path, count: int = TOP_TRIALS) -> list[dict[str, Any]]:
    """The tune stage's best trials (its trials.csv is sorted best first)."""
    with open(workspace / stages(workspace)["tune"].output("trials.csv"), newline="") as handle:
        return list(itertools.islice(csv.DictReader(handle), count))


@flow(name="kiln", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, workspace: Literal["clone", "here"] = "clone",
             storage_path: str | None = None) -> dict[str, Any]:
    """Apply `overrides` (dotted params.yaml keys, validated before anything else) in a workspace of this run and
    bring every stage up to date there; returns each stage's status and the experiment's name and commit.
    `storage_path`, when given, is train.storage_path: where Ray keeps checkpoints (a deployment's setting)."""
    source = Path.cwd()
    overrides = {**({"train.storage_path": storage_path} if storage_path else {}), **(overrides or {})}
    load_params(source / PARAMS_FILE, overrides)  # a bad override fails here, naming the key
    if workspace == "clone":
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())  # the checkout's store, not the workspace's
    folder = open_workspace(workspace, source)
    write_overrides(folder / PARAMS_FILE, overrides)
    name = f"{flow_run.get_name() or 'kiln'}-{str(flow_run.get_id() or '')[:8]}".strip("-")
    statuses: dict[str, str] = {}
    try:
        for stage in stages(folder):
            statuses[stage] = run_stage(stage, folder, pull=workspace == "here", experiment=name)
    except Exception:
        if statuses.get("evaluate") == RAN:  # a registered version keeps its lineage
            record(folder, name, shared_cache=workspace == "clone")
        raise
    experiment = record(folder, name, shared_cache=workspace == "clone")
    create_markdown_artifact(markdown({stage: (status, None) for stage, status in statuses.items()}, folder)
                             + f"\n\nDVC experiment `{name}` ({experiment.commit[:10]})",
                             key="kiln-run-report", description="kiln pipeline run")
    create_table_artifact(top_trials(folder), key="kiln-top-trials", description=f"best {TOP_TRIALS} tune trials")
    if workspace == "clone":
        shutil.rmtree(folder.parent, ignore_errors=True)
    return {"stages": statuses, "experiment": name, "commit": experiment.commit}


def run_from_cli(assignments: list[str]) -> None:
    """`kiln flow -S key=value ...`: run the flow once, here (Prefect's ephemeral API unless PREFECT_API_URL is set),
    printing the result as one JSON line."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            sys.exit(f"--set {assignment!r} is not KEY=VALUE")
        overrides[key.lstrip("+")] = yaml.safe_load(value)  # `++key=...`, as dvc exp run -S takes a new key
    try:
        result = pipeline(overrides=overrides)
    except InputError as exc:
        sys.exit(str(exc))
    print(json.dumps(result))
