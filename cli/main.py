"""`kiln`: the project's verbs in one command. `kiln --help` lists them; each has its own `--help`."""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from cli import cluster
from kiln.core.errors import InputError
from kiln.core.params import load_params
from kiln.platform import shell, summary
from tasks import stages

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
PIPELINE = "Pipeline"


@app.command(rich_help_panel=PIPELINE)
def run(targets: Annotated[list[str] | None, typer.Argument(help="Stages to bring up to date (default: all).")] = None,
        force: Annotated[bool, typer.Option(help="Run the stages even if DVC finds them up to date.")] = False) -> None:
    """Bring the pipeline up to date with `dvc repro` (DVC decides what is stale), then print the summary.

    A run that registers a model version is saved as a local DVC experiment (`dvc exp show` lists it), recorded on
    the version, so that `kiln reproduce` can rebuild it; so is what finished of a run that failed."""
    from kiln.evaluate.publish import EXPERIMENT_ENV

    name = f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    command = ["dvc", "repro", *(["--force"] if force else []), *(targets or [])]
    code, output = shell.stream(command, echo=print, env={**os.environ, EXPERIMENT_ENV: name})
    record_local(name)
    print(summary.render(summary.stage_statuses(output)))
    if code:
        sys.exit(f"kiln run: `{' '.join(command)}` failed (exit {code}); the stages above it finished")


def record_local(name: str) -> None:
    """Save this checkout as the experiment `name` and record it on the versions the run registered, if any."""
    from kiln.platform.lineage import record_experiment, registered_by
    from kiln.platform.workspace import save_experiment

    if registered_by(Path.cwd(), name):
        experiment = save_experiment(Path.cwd(), name)
        versions = record_experiment(Path.cwd(), experiment)
        print(f"lineage: experiment {name} ({experiment.commit[:10]}) recorded on {', '.join(versions)}")


@app.command("summary", rich_help_panel=PIPELINE)
def show_summary() -> None:
    """Print the results of the outputs in this checkout and what to open next."""
    print(summary.render({}))


@app.command(rich_help_panel=PIPELINE)
def flow(assignments: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="Override a params key for this run: train.epochs=3 (repeatable).")] = None) -> None:
    """Run the Prefect flow once, in a workspace of its own, recorded as a DVC experiment.

    Prefect's ephemeral API is used unless PREFECT_API_URL is set."""
    from flows.pipeline import run_from_cli

    run_from_cli(assignments or [])


@app.command(rich_help_panel="Models")
def reproduce(
    model_uri: Annotated[str, typer.Argument(help="A registered version: models:/NAME/VERSION or models:/NAME@ALIAS.")],
    workdir: Annotated[Path | None, typer.Option(help="Where to rebuild it [default: a new temporary folder].")] = None,
) -> None:
    """Rebuild a registered version from its lineage and compare every stage with the record.

    The lineage is the DVC experiment of the run (`kiln run`, `kiln flow`, a deployment, `dvc exp run`) that
    registered the version (see README, "Reproducing a registered version")."""
    from mlflow import MlflowClient

    from kiln.core.tracking import tracking_uri
    from kiln.platform.reproduce import lineage_of
    from kiln.platform.reproduce import reproduce as rebuild

    try:
        lineage = lineage_of(model_uri, MlflowClient(tracking_uri()))
        workspace = workdir or Path(tempfile.mkdtemp(prefix="kiln-reproduce-")) / "workspace"
        print(f"reproduce: {lineage.name} v{lineage.version} from {lineage.ref} ({lineage.commit[:10]}) of "
              f"{lineage.remote}, in {workspace}")
        checks = rebuild(lineage, workspace, echo=print)
    except InputError as exc:
        sys.exit(f"reproduce: {exc}")
    for check in checks:
        verdict = "identical" if check.identical else ("DIFFERS" if check.required else "differs (allowed)")
        print(f"  {check.stage:<9} {verdict:<18} {check.detail}")
    if any(check.required and not check.identical for check in checks):
        sys.exit(f"reproduce: {lineage.name} v{lineage.version} did not reproduce; see {workspace}")


@app.command(rich_help_panel="Models")
def predict(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="An .npy array or a folder of PNG/JPEG images.")],
    output: Annotated[Path, typer.Option(help="The CSV to write.")] = Path("predictions.csv"),
    model_uri: Annotated[str | None, typer.Option(help="A registered ONNX model or an .onnx file [default: "
                                                       "models:/NAME@champion, NAME from params' "
                                                       "tracking.registered_model].")] = None,
    task: Annotated[str | None, typer.Option(help="A multi-task model's task (dataset name) whose head predicts.")
                    ] = None,
    params: stages.ParamsFile = Path("params.yaml"),
) -> None:
    """Classify a batch of images with a registered model and write item,predicted,confidence rows."""
    from tasks.predict import predict as classify

    try:
        model_uri = model_uri or f"models:/{load_params(params).tracking.registered_model}@champion"
        count = classify(input_path, output, model_uri, task)
    except InputError as exc:
        sys.exit(f"predict: {exc}")
    print(f"predict: {count} items from {input_path} with {model_uri} -> {output}")


app.add_typer(cluster.app, name="cluster", rich_help_panel="Services")
stages.register(app)  # last, so `kiln --help` lists the everyday verbs first
