"""Benchmarks run the pipeline's stages the way dvc.yaml does, `python -m tasks STAGE --params FILE --ROLE PATH ...`,
on params and paths of their own (they import `kiln`, never `tasks`)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kiln.platform.contract import stages

ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage: str, params: Mapping[str, Any], paths: Mapping[str, Path], work: Path) -> float:
    """Run `stage` with `params` (written to work/STAGE-params.yaml) and `paths` (one per role its dvc.yaml command
    names); returns its wall time in seconds (Python start-up and imports included, as `dvc repro` pays them)."""
    roles = set(stages(ROOT)[stage].paths)
    if set(paths) != roles:
        raise ValueError(f"stage {stage!r} takes paths for {sorted(roles)}, got {sorted(paths)}")
    params_file = work / f"{stage}-params.yaml"
    params_file.write_text(yaml.safe_dump(dict(params), sort_keys=False))
    options = [item for role, path in paths.items() for item in (f"--{role.replace('_', '-')}", str(path))]
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tasks", stage, "--params", str(params_file), *options], cwd=ROOT,
                   check=True)
    return time.perf_counter() - started
