"""A multi-task model's evaluation rolled up: which logit columns are each task's (the layout training uses,
kiln.core.multitask.TaskLayout, read from the model's heads), each task's result, and the metrics over the tasks (each
task's suffixed `_<task>`, their means unsuffixed). A single-task model is the case of one task, with no suffix."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from kiln.core.errors import InputError
from kiln.core.inference import Logits, output_names
from kiln.core.models import task_heads
from kiln.core.multitask import logit_columns
from kiln.evaluate import explain
from kiln.evaluate.report import HEADLINE, REPORTS, Evaluated, summary_metrics

TASK_REPORTS = "tasks"  # a multi-task run's other tasks' reports: tasks/<task>/, the primary task's file names


@dataclass(frozen=True)
class TaskResult:
    """One task's evaluation: both models on its test split (`y_test`: the task's own labels), explanation fidelity."""

    task: str
    models: dict[str, Evaluated]
    fidelity: dict[str, dict[str, float]]
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    offset: int  # its first logit column in a multi-task model


def head_columns(model: nn.Module) -> dict[str, slice]:
    """Each task's logit columns in a multi-task model, in head order ({} for a single-task model)."""
    return logit_columns(task_heads(model))


def check_tasks(model: Path, columns: dict[str, slice], folders: dict[str, Path]) -> None:
    """InputError unless the model's heads are the prepared tasks (a single-task model: the primary one only)."""
    if list(columns or folders)[:1] != list(folders)[:1] or (columns and list(columns) != list(folders)):
        raise InputError(f"{model}: its heads ({', '.join(columns) or 'one task'}) are not the prepared tasks "
                         f"({', '.join(folders)}); run `dvc repro train`")


def head_logits(run: Logits, columns: slice | None) -> Logits:
    """One task's logits of a multi-task model's side-by-side logits (all of them for a single task)."""
    return run if columns is None else lambda images: run(images)[:, columns]


def named_outputs(run: Logits, columns: dict[str, slice]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A multi-task model's logits as {logits_<task>: that head's}, its ONNX outputs (for the signature)."""
    names = dict(zip(output_names(list(columns)), columns.values(), strict=True))

    def outputs(images: np.ndarray) -> dict[str, np.ndarray]:
        logits = run(images)
        return {name: logits[:, task_columns] for name, task_columns in names.items()}

    return outputs


def task_reports(folder: Path) -> dict[str, Path]:
    """A non-primary task's report files, named as the primary task's, in its own folder (created)."""
    folder.mkdir()
    return {key: folder / name for key, name in {**REPORTS, **explain.REPORTS}.items()}


def per_task(results: list[TaskResult], values: Callable[[TaskResult], dict[str, float]]) -> dict[str, float]:
    """`values` of the one task as they are; of several tasks, each suffixed `_<task>`, and the means of the keys they
    share unsuffixed."""
    if len(results) == 1:
        return dict(values(results[0]))
    tables = {result.task: values(result) for result in results}
    means = {key: float(np.mean([table[key] for table in tables.values()])) for key in tables[results[0].task]
             if all(key in table for table in tables.values())}
    return {**means, **{f"{key}_{task}": value for task, table in tables.items() for key, value in table.items()}}


def combined_summary(results: list[TaskResult]) -> dict[str, float]:
    """summary_metrics over the tasks (per_task's keys): the deployable's as they are, the baseline's `fp32_`."""
    return per_task(results, lambda result: summary_metrics(result.models))


def headline(metrics: dict[str, float], results: list[TaskResult]) -> dict[str, float]:
    """The HEADLINE keys of `metrics` (`dvc metrics show`), with their per-task forms."""
    keys = {*HEADLINE, *(f"fp32_{key}" for key in HEADLINE)}
    return {key: value for key, value in metrics.items()
            if key in keys or any(key.removesuffix(f"_{result.task}") in keys for result in results)}
