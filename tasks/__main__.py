"""`python -m tasks STAGE [--params params.yaml]`: validate params.yaml, then run one stage.

Params are checked before the stage module (torch, Ray, MLflow) is even imported, so bad input
fails in about a second. Input errors print without a traceback and exit 1.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from kiln.config import load_params
from kiln.errors import InputError

STAGES = ("prepare", "tune", "train", "compress", "evaluate")


def main(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.")],
    params_path: Annotated[Path, typer.Option("--params", help="The params file.")] = Path("params.yaml"),
) -> None:
    """Run one pipeline stage with the paths dvc.yaml declares."""
    if stage not in STAGES:
        sys.exit(f"unknown stage {stage!r}; allowed: {', '.join(STAGES)}")
    started = time.perf_counter()
    try:
        params = load_params(params_path)
        importlib.import_module(f"tasks.{stage}").run(params)
    except (InputError, FileNotFoundError) as exc:
        sys.exit(f"{stage}: {exc}")
    print(f"{stage}: done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    typer.run(main)
