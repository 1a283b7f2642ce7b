"""`kiln`: the project's verbs in one command. `kiln --help` lists them; each has its own `--help`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kiln.core import shell
from kiln.core.errors import InputError
from kiln.core.params import load_params
from tasks import stages, summary

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
stages.register(app)
PIPELINE = "Pipeline"


@app.command(rich_help_panel=PIPELINE)
def run(targets: Annotated[list[str] | None, typer.Argument(help="Stages to bring up to date (default: all).")] = None,
        force: Annotated[bool, typer.Option(help="Run the stages even if DVC finds them up to date.")] = False) -> None:
    """Bring the pipeline up to date with `dvc repro` (DVC decides what is stale), then print the summary."""
    command = ["dvc", "repro", *(["--force"] if force else []), *(targets or [])]
    code, output = shell.stream(command, echo=print)
    print(summary.render(summary.stage_statuses(output)))
    if code:
        sys.exit(f"kiln run: `{' '.join(command)}` failed (exit {code}); the stages above it finished")


@app.command("summary", rich_help_panel=PIPELINE)
def show_summary() -> None:
    """Print the results of the outputs in this checkout and what to open next."""
    print(summary.render({}))


@app.command(rich_help_panel=PIPELINE)
def flow(assignments: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="Override a params key for this run: train.epochs=3 (repeatable).")] = None) -> None:
    """Run the Prefect flow once, here: in a workspace of its own, recorded as a DVC experiment (Prefect's
    ephemeral API unless PREFECT_API_URL is set)."""
    from flows.pipeline import run_from_cli

    run_from_cli(assignments or [])


@app.command(rich_help_panel="Models")
def predict(
    input_path: Annotated[Path, typer.Argument(metavar="INPUT", help="An .npy array or a folder of PNG/JPEG images.")],
    output: Annotated[Path, typer.Option(help="The CSV to write.")] = Path("predictions.csv"),
    model_uri: Annotated[str | None, typer.Option(help="A registered ONNX model [default: models:/NAME@champion, "
                                                       "NAME from params' tracking.registered_model].")] = None,
    params: stages.ParamsFile = Path("params.yaml"),
) -> None:
    """Classify a batch of images with a registered model and write item,predicted,confidence rows."""
    from tasks.predict import predict as classify

    try:
        model_uri = model_uri or f"models:/{load_params(params).tracking.registered_model}@champion"
        count = classify(input_path, output, model_uri)
    except InputError as exc:
        sys.exit(f"predict: {exc}")
    print(f"predict: {count} items from {input_path} with {model_uri} -> {output}")
