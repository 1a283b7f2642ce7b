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

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import infer_signature
from torch import nn

from kiln.core.errors import InputError
from kiln.core.files import atomic_path, read_json, write_json
from kiln.core.inference import onnx_logits, torch_logits
from kiln.core.models import load_trained_model
from kiln.core.params import Params
from kiln.core.prepared import load_split, read_manifest, stratified_head, to_float
from kiln.core.tracking import lineage_tags, use_experiment
from kiln.evaluate import explain
from kiln.evaluate.measures import perturbed_sets
from kiln.evaluate.publish import pinned, promotion_gate, register_onnx
from kiln.evaluate.registry import PREDICTIONS, Decision, predictions_record, resolve_version
from kiln.evaluate.report import REPORTS, Candidate, Evaluated, evaluate_candidates, summary_metrics, write_reports

EXAMPLE_ROWS = 2  # of the logged input example: torch.export would fix a batch dimension of 1
REGISTRATION = "registration.json"
FINETUNE_BASE = "finetune_base.json"


def run(params: Params, data: Path, model: Path, deployable: Path, selection: Path,
        reports: Path) -> tuple[dict[str, float], Decision]:
    """Evaluate both models, log them, register the deployable one and apply the promotion gate."""
    for path, stage in ((model, "train"), (deployable, "compress"), (selection, "compress")):
        if not path.is_file():
            raise InputError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    settings = params.evaluate
    classes = read_manifest(data)["classes"]
    x_test, y_test = load_split(data, "test")
    images = to_float(x_test)
    fp32_model, saved = load_trained_model(str(model))
    deployable_logits = onnx_logits(deployable)  # a corrupt file fails here, before any work
    use_experiment(params.tracking.experiment)  # so does a tracking server that is down
    variant = read_json(selection)["selected_variant"]
    subset = stratified_head(y_test, settings.robustness_samples, settings.seed)
    sets = perturbed_sets(fp32_model, images[subset], y_test[subset], settings, source="fp32", seed=settings.seed)
    candidates = [Candidate("baseline", "fp32", model, "white-box", torch_logits(fp32_model)),
                  Candidate("deployable", variant, deployable, "transfer-from-fp32", deployable_logits)]
    models = evaluate_candidates(candidates, images, y_test, classes, settings.calibration_bins, sets,
                                 y_test[subset], params.latency)
    summary = summary_metrics(models)

    lineage = {**lineage_tags(params, data), "kiln.train_run_id": saved["mlflow_run_id"],
               "kiln.tune_run_id": saved["tune_run_id"]}
    with ExitStack() as stack:  # the reports move into place when the block exits without error
        out = {key: stack.enter_context(atomic_path(reports / name))
               for key, name in {**REPORTS, **explain.REPORTS, "registration": REGISTRATION,
                                 "finetune_base": FINETUNE_BASE}.items()}
        write_reports(out, models, y_test, classes)
        fidelity = explain.save_explanations(fp32_model, images, y_test, classes, settings.explain_steps,
                                             settings.seed, stratified_head(y_test, explain.IMAGES, settings.seed),
                                             out)
        decision = log_and_register(params, models, fidelity, fp32_model, lineage, out, x_test, y_test, classes)
        name = params.tracking.registered_model
        write_json(out["registration"], {"registered_model": name, **decision.as_dict()})
        write_json(out["finetune_base"], finetune_base(name, params.finetune.base))
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    print(f"evaluate: test_accuracy={summary['test_accuracy']:.4f} macro_f1={summary['test_macro_f1']:.4f} "
          f"(fp32 {summary['fp32_test_accuracy']:.4f}); registered {params.tracking.registered_model} "
          f"v{decision.version} ({variant}) as challenger, {verdict}: {decision.reason}")
    return summary, decision


def finetune_base(name: str, reference: str) -> dict[str, str | None]:
    """Which version `reference` (finetune.base) names now: the file changes, and fine-tuning re-runs, only when it
    moves. A reference that names nothing is recorded as such; the finetune stage reports it."""
    try:
        version: str | None = resolve_version(MlflowClient(), name, reference)
    except InputError:
        version = None
    return {"registered_model": name, "reference": reference, "version": version}


def log_and_register(params: Params, models: dict[str, Evaluated], fidelity: dict[str, dict[str, float]],
                     fp32_model: nn.Module, lineage: dict[str, str], out: dict[str, Path], x_test: np.ndarray,
                     y_test: np.ndarray, classes: list[str]) -> Decision:
    """The parent run (with the explanations and their fidelity) and a child run per model; the deployable
    registered, then the gate moves the aliases."""
    baseline, deployable = models["baseline"], models["deployable"]
    example = to_float(x_test[:EXAMPLE_ROWS])
    variant = deployable.candidate.variant
    with mlflow.start_run(run_name="evaluate", tags={"kiln.stage": "evaluate", "kiln.deployable_variant": variant,
                                                     **lineage}) as parent:
        mlflow.log_params(params.evaluate.model_dump())
        mlflow.log_metrics({**summary_metrics(models), **{f"explain_{method}_{key}": value for method, scores in
                                                          fidelity.items() for key, value in scores.items()}})
        for key in {**REPORTS, **explain.REPORTS}:
            mlflow.log_artifact(str(out[key]))
        with child_run(baseline, lineage, x_test, y_test, out["fp32_confusion"]):
            mlflow.pytorch.log_model(fp32_model, name="model", input_example=example, metadata={"classes": classes},
                                     signature=infer_signature(example, baseline.candidate.logits(example)),
                                     pip_requirements=pinned("torch"))
        with child_run(deployable, lineage, x_test, y_test, out["confusion"]):
            decision = register_onnx(
                deployable.candidate.path, baseline.candidate.path, deployable.candidate.logits, example, classes,
                params.tracking.registered_model,
                {**lineage, "kiln.variant": variant, "kiln.evaluate_run_id": parent.info.run_id},
                promotion_gate(params))
            log_decision(decision)
        log_decision(decision)
    return decision


@contextmanager
def child_run(model: Evaluated, tags: dict[str, str], x_test: np.ndarray, y_test: np.ndarray,
              confusion_plot: Path) -> Iterator[None]:
    """A nested run for one model: its metrics (the same keys for every model), params, tags, paired predictions."""
    candidate = model.candidate
    tags = {**tags, "kiln.stage": "evaluate-model", "kiln.variant": candidate.variant, "kiln.attack": candidate.attack}
    with mlflow.start_run(run_name=candidate.role, nested=True, tags=tags):
        mlflow.log_params({"variant": candidate.variant, "model_file": str(candidate.path), "attack": candidate.attack})
        mlflow.log_metrics({**model.result.metrics, **model.result.per_class})
        mlflow.log_dict(predictions_record(x_test, y_test, model.result.predicted), PREDICTIONS)
        mlflow.log_artifact(str(confusion_plot))
        yield


def log_decision(decision: Decision) -> None:
    """The gate's decision on the active run: promotion.json, tags and gate_* metrics."""
    mlflow.log_dict(decision.as_dict(), "promotion.json")
    mlflow.set_tags({"kiln.promoted": str(decision.promoted).lower(), "kiln.promotion_reason": decision.reason,
                     "kiln.model_version": decision.version})
    mlflow.log_metrics({f"gate_{key}": getattr(decision, key) for key in ("delta", "b", "c", "p_value")
                        if getattr(decision, key) is not None})

