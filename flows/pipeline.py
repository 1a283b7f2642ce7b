"""The kiln Prefect flow: runs the dvc.yaml stages in DAG order, one Prefect task each, DVC deciding what is stale."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from kiln.config import ParamsError, write_overrides

TRIALS = Path("reports/tune/trials.csv")
TOP_TRIALS = 5


def dag_stages(dvc_file: Path = Path("dvc.yaml")) -> list[str]:
    """Stage names in the order dvc.yaml declares them (which is DAG order)."""
    return list(yaml.safe_load(dvc_file.read_text())["stages"])


@task(task_run_name="{stage}")
def run_stage(stage: str) -> str:
    """`dvc repro` one stage, streaming its output into the Prefect log; returns 'ran' or 'skipped'."""
    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", stage]
    output = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            logger.info(line.rstrip())
            output.append(line)
    if process.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed: `{' '.join(command)}` exited {process.returncode}")
    return "skipped" if any("didn't change, skipping" in line for line in output) else "ran"


def run_report(statuses: dict[str, str]) -> str:
    """Markdown: what each stage did, and the headline metrics."""
    rows = ["| stage | status | metrics |", "| --- | --- | --- |"]
    for stage, status in statuses.items():
        metrics_file = Path("reports") / stage / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        shown = ", ".join(f"{key}={value:.4g}" for key, value in sorted(metrics.items()))
        rows.append(f"| {stage} | {status} | {shown} |")
    return "\n".join(rows)


def top_trials(count: int = TOP_TRIALS) -> list[dict[str, Any]]:
    """The tune stage's best trials (its trials.csv is sorted best first)."""
    with open(TRIALS, newline="") as handle:
        return list(itertools.islice(csv.DictReader(handle), count))


@flow(name="kiln", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """Apply `overrides` (dotted params.yaml keys, validated first) and bring every stage up to date."""
    write_overrides("params.yaml", overrides or {})
    statuses = {stage: run_stage(stage) for stage in dag_stages()}
    create_markdown_artifact(run_report(statuses), key="kiln-run-report", description="kiln pipeline run")
    if TRIALS.is_file():
        create_table_artifact(top_trials(), key="kiln-top-trials", description=f"best {TOP_TRIALS} tune trials")
    return statuses


def main(
    assignments: Annotated[list[str], typer.Option("--set", "-S", help="Override a params.yaml key: train.epochs=3")],
) -> None:
    """Run the flow once, here (Prefect's ephemeral API unless PREFECT_API_URL is set)."""
    overrides = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise typer.BadParameter(f"{assignment!r} is not KEY=VALUE", param_hint="--set")
        overrides[key] = yaml.safe_load(value)
    try:
        statuses = pipeline(overrides=overrides)
    except ParamsError as exc:
        sys.exit(str(exc))
    print(json.dumps({"stages": statuses}))


if __name__ == "__main__":
    typer.run(main)
