"""What the evaluate stage leaves in MLflow and the registry: a parent run `evaluate` (the deployable's metrics as they
are, the baseline's prefixed `fp32_`, the reports, the gate's decision) with a child run per model (tag
kiln.stage=evaluate-model, the same metric keys, its model: the baseline in the PyTorch flavour, the deployable in the
ONNX flavour, registered with lineage tags, whose aliases the gate moves last), and the stage's registry files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import infer_signature
from torch import nn

from kiln.core.errors import InputError
from kiln.core.inference import Logits
from kiln.core.params import Params
from kiln.core.prepared import to_float
from kiln.evaluate import explain
from kiln.evaluate.gate import Decision, Gate, predictions_record
from kiln.evaluate.multitask import TASK_REPORTS, TaskResult, combined_summary, named_outputs, per_task
from kiln.evaluate.publish import pinned, register_onnx
from kiln.evaluate.registry import PREDICTIONS, resolve_version
from kiln.evaluate.report import REPORTS

EXAMPLE_ROWS = 2  # of the logged input example: torch.export would fix a batch dimension of 1
REGISTRY_REPORTS = {"registration": "registration.json",  # the version registered and the gate's decision
                    "finetune_base": "finetune_base.json"}  # the version finetune.base names: finetune's dep


def log_and_register(params: Params, results: list[TaskResult], fp32_model: nn.Module, deployable_logits: Logits,
                     columns: dict[str, slice], lineage: dict[str, str], out: dict[str, Path],
                     others: Path) -> Decision:
    """The parent run (with the explanations and their fidelity) and a child run per model; the deployable
    registered, then the gate moves the aliases. A multi-task model's signature names each task's output."""
    primary = results[0]
    baseline, deployable = primary.models["baseline"], primary.models["deployable"]
    example = to_float(primary.x_test[:EXAMPLE_ROWS])
    variant = deployable.candidate.variant
    fidelity = per_task(results, lambda result: {f"explain_{method}_{key}": value for method, scores in
                                                 result.fidelity.items() for key, value in scores.items()})
    classes = {result.task: result.classes for result in results} if columns else primary.classes
    outputs = named_outputs(deployable_logits, columns) if columns else deployable_logits
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


def finetune_base(name: str, reference: str) -> dict[str, str | None]:
    """Which version `reference` (finetune.base) names now: the file changes, and fine-tuning re-runs, only when it
    moves. A reference that names nothing is recorded as such; the finetune stage reports it."""
    try:
        version: str | None = resolve_version(MlflowClient(), name, reference)
    except InputError:
        version = None
    return {"registered_model": name, "reference": reference, "version": version}
