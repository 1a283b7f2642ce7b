"""Stage `evaluate`: the fp32 baseline (--model, PyTorch) and the deployable model (--deployable, the ONNX variant
compress selected) on the test split; MLflow logging; registration of the deployable; the promotion gate.

Metrics and reports: kiln.evaluate.report. MLflow: a parent run `evaluate` (the deployable's metrics as they are, the
baseline's prefixed `fp32_`, the reports, the gate's decision) with child runs `baseline` and `deployable` (tag
kiln.stage=evaluate-model) that log the same metric keys and their model: the baseline in the PyTorch flavour, the
deployable in the ONNX flavour (what batch inference loads), registered with lineage tags. Everything is computed
before anything is logged, the aliases move last (kiln.evaluate.registry.promote), and the report files (with
registration.json: the version and the gate's decision, and finetune_base.json: the version finetune.base names
afterwards, the finetune stage's dep) move into place only when all of it succeeded. The deployable's run also keeps the
PyTorch model it was compressed from (`source/model.pt`), the weights fine-tuning starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import infer_signature
from torch import nn

from kiln.core.errors import InputError
from kiln.core.files import atomic_path, read_json, write_json
from kiln.core.inference import Logits, onnx_logits, output_names, torch_logits
from kiln.core.models import TaskHead, load_trained_model, task_heads
from kiln.core.params import Params
from kiln.core.prepared import load_split, read_manifest, stratified_head, task_folders, to_float
from kiln.core.tracking import lineage_tags, use_experiment
from kiln.evaluate import explain
from kiln.evaluate.gate import Decision, Gate, predictions_record
from kiln.evaluate.measures import perturbed_sets
from kiln.evaluate.publish import pinned, register_onnx
from kiln.evaluate.registry import PREDICTIONS, resolve_version
from kiln.evaluate.report import (
    HEADLINE,
    REPORTS,
    Candidate,
    Evaluated,
    evaluate_candidates,
    summary_metrics,
    write_reports,
)

TASK_REPORTS = "tasks"  # a multi-task run's other tasks' reports: tasks/<task>/, the primary task's file names
EXAMPLE_ROWS = 2  # of the logged input example: torch.export would fix a batch dimension of 1
REGISTRATION = "registration.json"
FINETUNE_BASE = "finetune_base.json"


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


def run(params: Params, data: Path, model: Path, deployable: Path, selection: Path,
        reports: Path) -> tuple[dict[str, float], Decision]:
    """Evaluate both models on every task, log them, register the deployable one and apply the promotion gate."""
    for path, stage in ((model, "train"), (deployable, "compress"), (selection, "compress")):
        if not path.is_file():
            raise InputError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    fp32_model, saved = load_trained_model(str(model))
    folders, heads = task_folders(data), task_heads(fp32_model)
    if list(heads or folders)[:1] != list(folders)[:1] or (heads and list(heads) != list(folders)):
        raise InputError(f"{model}: its heads ({', '.join(heads) or 'one task'}) are not the prepared tasks "
                         f"({', '.join(folders)}); run `dvc repro train`")
    deployable_logits = onnx_logits(deployable)  # a corrupt file fails here, before any work
    use_experiment(params.tracking.experiment)  # so does a tracking server that is down
    variant = read_json(selection)["selected_variant"]
    bounds = pairwise(np.cumsum([0, *heads.values()]).tolist())
    columns = {task: slice(first, end) for task, (first, end) in zip(heads, bounds, strict=True)}  # {}: one task

    lineage = {**lineage_tags(params, data), "kiln.train_run_id": saved["mlflow_run_id"],
               "kiln.tune_run_id": saved["tune_run_id"]}
    with ExitStack() as stack:  # the reports move into place when the block exits without error
        out = {key: stack.enter_context(atomic_path(reports / name))
               for key, name in {**REPORTS, **explain.REPORTS, "registration": REGISTRATION,
                                 "finetune_base": FINETUNE_BASE}.items()}
        others = stack.enter_context(atomic_path(reports / TASK_REPORTS))  # the other tasks' reports (multi-task)
        others.mkdir()
        results = [assess_task(params, task, folder, columns.get(task), fp32_model, deployable_logits, model,
                               deployable, variant, out if index == 0 else task_reports(others / task))
                   for index, (task, folder) in enumerate(folders.items())]
        if len(results) > 1:
            write_json(out["metrics"], headline(combined_summary(results), results))
        decision = log_and_register(params, results, fp32_model, deployable_logits, lineage, out, others)
        name = params.tracking.registered_model
        write_json(out["registration"], {"registered_model": name, **decision.as_dict()})
        write_json(out["finetune_base"], finetune_base(name, params.finetune.base))
    summary = combined_summary(results)
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    per_task = "".join(f" {r.task} {summary[f'test_accuracy_{r.task}']:.4f}" for r in results if len(results) > 1)
    print(f"evaluate: test_accuracy={summary['test_accuracy']:.4f}{per_task} macro_f1={summary['test_macro_f1']:.4f} "
          f"(fp32 {summary['fp32_test_accuracy']:.4f}); registered {params.tracking.registered_model} "
          f"v{decision.version} ({variant}) as challenger, {verdict}: {decision.reason}")
    return summary, decision


def task_reports(folder: Path) -> dict[str, Path]:
    """A non-primary task's report files, named as the primary task's, in its own folder (created)."""
    folder.mkdir()
    return {key: folder / name for key, name in {**REPORTS, **explain.REPORTS}.items()}


def named_outputs(run: Logits, tasks: dict[str, int]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A multi-task model's logits as {logits_<task>: that head's}, its ONNX outputs (for the signature)."""
    splits = np.cumsum(list(tasks.values()))[:-1]
    return lambda images: dict(zip(output_names(list(tasks)), np.split(run(images), splits, axis=1), strict=True))


def head_logits(run: Logits, columns: slice | None) -> Logits:
    """One task's logits of a multi-task model's side-by-side logits (all of them for a single task)."""
    return run if columns is None else lambda images: run(images)[:, columns]


def assess_task(params: Params, task: str, folder: Path, columns: slice | None, fp32_model: nn.Module,
                deployable_logits: Logits, model: Path, deployable: Path, variant: str,
                out: dict[str, Path]) -> TaskResult:
    """Both models on one task's test split: every metric, robustness, explanations; its reports written to `out`."""
    settings = params.evaluate
    classes = read_manifest(folder)["classes"]
    x_test, y_test = load_split(folder, "test")
    images = to_float(x_test)
    head = fp32_model if columns is None else TaskHead(fp32_model, columns)
    if columns is not None:
        print(f"evaluate: task {task}, {len(y_test)} test images", flush=True)
    subset = stratified_head(y_test, settings.robustness_samples, settings.seed)
    sets = perturbed_sets(head, images[subset], y_test[subset], settings, source="fp32", seed=settings.seed)
    candidates = [Candidate("baseline", "fp32", model, "white-box", torch_logits(head)),
                  Candidate("deployable", variant, deployable, "transfer-from-fp32",
                            head_logits(deployable_logits, columns))]
    models = evaluate_candidates(candidates, images, y_test, classes, settings.calibration_bins, sets,
                                 y_test[subset], params.latency)
    write_reports(out, models, y_test, classes)
    fidelity = explain.save_explanations(head, images, y_test, classes, settings.explain_steps, settings.seed,
                                         stratified_head(y_test, explain.IMAGES, settings.seed), out)
    return TaskResult(task, models, fidelity, x_test, y_test, classes, 0 if columns is None else columns.start)


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


def finetune_base(name: str, reference: str) -> dict[str, str | None]:
    """Which version `reference` (finetune.base) names now: the file changes, and fine-tuning re-runs, only when it
    moves. A reference that names nothing is recorded as such; the finetune stage reports it."""
    try:
        version: str | None = resolve_version(MlflowClient(), name, reference)
    except InputError:
        version = None
    return {"registered_model": name, "reference": reference, "version": version}


def log_and_register(params: Params, results: list[TaskResult], fp32_model: nn.Module, deployable_logits: Logits,
                     lineage: dict[str, str], out: dict[str, Path], others: Path) -> Decision:
    """The parent run (with the explanations and their fidelity) and a child run per model; the deployable
    registered, then the gate moves the aliases. A multi-task model's signature names each task's output."""
    primary = results[0]
    baseline, deployable = primary.models["baseline"], primary.models["deployable"]
    example = to_float(primary.x_test[:EXAMPLE_ROWS])
    variant = deployable.candidate.variant
    fidelity = per_task(results, lambda result: {f"explain_{method}_{key}": value for method, scores in
                                                 result.fidelity.items() for key, value in scores.items()})
    tasks = task_heads(fp32_model)
    classes = {result.task: result.classes for result in results} if tasks else primary.classes
    outputs = named_outputs(deployable_logits, tasks) if tasks else deployable_logits
    with mlflow.start_run(run_name="evaluate", tags={"kiln.stage": "evaluate", "kiln.deployable_variant": variant,
                                                     **lineage}) as parent:
        mlflow.log_params(params.evaluate.model_dump())
        mlflow.log_metrics({**combined_summary(results), **fidelity})
        for key in {**REPORTS, **explain.REPORTS}:
            mlflow.log_artifact(str(out[key]))
        if len(results) > 1:
            mlflow.log_artifacts(str(others), TASK_REPORTS)
        with child_run(results, "baseline", lineage, out["fp32_confusion"]):
            mlflow.pytorch.log_model(fp32_model, name="model", input_example=example, metadata={"classes": classes},
                                     signature=infer_signature(example, baseline.candidate.logits(example)),
                                     pip_requirements=pinned("torch"))
        with child_run(results, "deployable", lineage, out["confusion"]):
            decision = register_onnx(
                deployable.candidate.path, baseline.candidate.path, outputs, example, classes,
                params.tracking.registered_model,
                {**lineage, "kiln.variant": variant, "kiln.evaluate_run_id": parent.info.run_id},
                Gate.from_params(params))
            log_decision(decision)
        log_decision(decision)
    return decision


@contextmanager
def child_run(results: list[TaskResult], role: str, tags: dict[str, str], confusion_plot: Path) -> Iterator[None]:
    """A nested run for one model: its metrics (the same keys for every model), params, tags, and its paired
    predictions over every task's test split (a multi-task model's labels offset into its logit columns)."""
    candidate = results[0].models[role].candidate
    tags = {**tags, "kiln.stage": "evaluate-model", "kiln.variant": candidate.variant, "kiln.attack": candidate.attack}
    with mlflow.start_run(run_name=candidate.role, nested=True, tags=tags):
        mlflow.log_params({"variant": candidate.variant, "model_file": str(candidate.path), "attack": candidate.attack})
        mlflow.log_metrics({**per_task(results, lambda result: result.models[role].result.metrics),
                            **per_task(results, lambda result: result.models[role].result.per_class)})
        mlflow.log_dict(predictions_record(np.concatenate([result.x_test for result in results]),
                                           np.concatenate([result.y_test + result.offset for result in results]),
                                           np.concatenate([result.models[role].result.predicted + result.offset
                                                           for result in results])), PREDICTIONS)
        mlflow.log_artifact(str(confusion_plot))
        yield


def log_decision(decision: Decision) -> None:
    """The gate's decision on the active run: promotion.json, tags and gate_* metrics."""
    mlflow.log_dict(decision.as_dict(), "promotion.json")
    mlflow.set_tags({"kiln.promoted": str(decision.promoted).lower(), "kiln.promotion_reason": decision.reason,
                     "kiln.model_version": decision.version})
    mlflow.log_metrics({f"gate_{key}": getattr(decision, key) for key in ("delta", "b", "c", "p_value")
                        if getattr(decision, key) is not None})

