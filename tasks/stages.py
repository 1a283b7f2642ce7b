"""The stage commands dvc.yaml runs: `python -m tasks STAGE --ROLE PATH ...` (the same as `kiln STAGE ...`).

Every path a stage reads or writes is an option, so dvc.yaml's command line is the one place it is written. Each
command validates the params file before the stage module (torch, Ray, MLflow) is even imported, so bad input fails in
about a second; input errors print without a traceback and exit 1.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from kiln.core.errors import InputError
from kiln.core.params import load_params

ParamsFile = Annotated[Path, typer.Option("--params", help="The params file.")]
Data = Annotated[Path, typer.Option(help="The prepared data folder (prepare's --out).")]
BestConfig = Annotated[Path, typer.Option(help="The tuned hyperparameters (JSON).")]
TrainedModel = Annotated[Path, typer.Option(help="The trained model (train's --model).")]
Reports = Annotated[Path, typer.Option(help="The folder of this stage's metrics, tables and figures.")]


def run_stage(stage: str, params_file: Path, **paths: Path) -> None:
    """Validate `params_file`, then run `tasks.<stage>.run(params, **paths)`, timing it."""
    started = time.perf_counter()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # progress bars make a stage's log noise
    try:
        params = load_params(params_file)
        importlib.import_module(f"tasks.{stage}").run(params, **paths)
    except (InputError, FileNotFoundError) as exc:
        sys.exit(f"{stage}: {exc}")
    print(f"{stage}: done in {time.perf_counter() - started:.0f} s", flush=True)


COMMANDS: list[Callable[..., None]] = []  # every stage's command, in dvc.yaml's order
PANEL = "Stages (dvc.yaml runs these; `kiln run` runs them through DVC)"


def stage_command(command: Callable[..., None]) -> Callable[..., None]:
    """Mark `command` (named after its stage) as a stage's command: `register` adds it to an app."""
    COMMANDS.append(command)
    return command


def register(app: typer.Typer) -> None:
    """Add every stage's command to `app` (`python -m tasks`, and `kiln`)."""
    for command in COMMANDS:
        app.command(command.__name__, rich_help_panel=PANEL)(command)


@stage_command
def prepare(out: Annotated[Path, typer.Option(help="Where the splits and manifest go.")],
            params: ParamsFile = Path("params.yaml")) -> None:
    """Read, validate and split the raw dataset (prepare.data_dir)."""
    run_stage("prepare", params, out=out)


@stage_command
def tune(data: Data, best_config: BestConfig, reports: Reports, params: ParamsFile = Path("params.yaml")) -> None:
    """Search hyperparameters with Ray Tune; write the best ones to --best-config."""
    run_stage("tune", params, data=data, best_config=best_config, reports=reports)


@stage_command
def train(data: Data, best_config: BestConfig,
          model: Annotated[Path, typer.Option(help="Where the trained model goes.")], reports: Reports,
          params: ParamsFile = Path("params.yaml")) -> None:
    """Train the model with Ray Train (DDP) on the tuned hyperparameters."""
    run_stage("train", params, data=data, best_config=best_config, model=model, reports=reports)


@stage_command
def compress(model: TrainedModel, data: Data,
             onnx_dir: Annotated[Path, typer.Option(help="Where the fp32, int8 and deployable ONNX files go.")],
             reports: Reports, params: ParamsFile = Path("params.yaml")) -> None:
    """Build and measure the compression variants; ship the deployable one."""
    run_stage("compress", params, model=model, data=data, onnx_dir=onnx_dir, reports=reports)


@stage_command
def evaluate(data: Data, model: TrainedModel,
             deployable: Annotated[Path, typer.Option(help="The deployable ONNX model (compress's).")],
             selection: Annotated[Path, typer.Option(help="compress's selection.json.")], reports: Reports,
             params: ParamsFile = Path("params.yaml")) -> None:
    """Evaluate the baseline and the deployable model; register the deployable one; apply the gate."""
    run_stage("evaluate", params, data=data, model=model, deployable=deployable, selection=selection,
              reports=reports)


@stage_command
def finetune_data(out: Annotated[Path, typer.Option(help="Where the target's splits and manifest go.")],
                  params: ParamsFile = Path("params.yaml")) -> None:
    """Read, resize and split the fine-tuning target (finetune.target)."""
    run_stage("finetune_data", params, out=out)


@stage_command
def finetune(base: Annotated[Path, typer.Option(help="evaluate's finetune_base.json (the base's version).")],
             data: Annotated[Path, typer.Option(help="The prepared target (finetune_data's --out).")],
             model: Annotated[Path, typer.Option(help="Where the selected method's merged model goes.")],
             onnx_model: Annotated[Path, typer.Option(help="Where its ONNX export goes.")], reports: Reports,
             params: ParamsFile = Path("params.yaml")) -> None:
    """Fine-tune the registered base with every method; register the selected one."""
    run_stage("finetune", params, base=base, data=data, model=model, onnx_model=onnx_model,
              reports=reports)
