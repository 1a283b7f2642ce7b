"""The frame every stage runs in, written once: its MLflow experiment and Ray (`open_stage`), its run tagged with the
stage and its lineage (`stage_run`), and its reports moved into place together (`reports_together`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlflow

from kiln.core import ray_cluster
from kiln.core.files import atomic_path
from kiln.core.params import Params
from kiln.core.tracking import lineage_tags, use_experiment


def open_stage(params: Params, cpus: tuple[float, str] | None = None) -> str:
    """Point MLflow at the store and `tracking.experiment` (checking a tracking server answers), and, given `cpus`
    (how many, and the params keys asking for them), join Ray and fail now if it can never give them; returns the
    tracking URI."""
    uri = use_experiment(params.tracking.experiment)
    if cpus is not None:
        ray_cluster.join(*cpus)
    return uri


@contextmanager
def stage_run(stage: str, params: Params, data: Path, run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """The stage's MLflow run (run `run_id` again when a resumed stage names one), tagged `kiln.stage`, with the
    lineage of `params` and the prepared `data`, and `tags`."""
    with mlflow.start_run(run_id=run_id, run_name=stage,
                          tags={"kiln.stage": stage, **(tags or {}), **lineage_tags(params, data)}) as run:
        yield run


@contextmanager
def reports_together(folder: Path, names: Mapping[str, str]) -> Iterator[dict[str, Path]]:
    """A temporary path per report (key -> file name in `folder`); all of them move into place when the block exits
    without an error, none otherwise."""
    with ExitStack() as stack:
        yield {key: stack.enter_context(atomic_path(folder / name)) for key, name in names.items()}
