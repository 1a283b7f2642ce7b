"""Stage `evaluate`: the baseline (fp32 torch, models/model.pt) and the deployable model (models/deployable.onnx, the
variant compress selected) on the test split; MLflow logging; registration of the deployable; the promotion gate.

Both models get the same metrics (kiln.evaluation): accuracy, macro-F1, per-class precision and recall, ECE,
robustness on a stratified test subset (FGSM and PGD examples crafted on the fp32 model, so white-box for the baseline
and a transfer attack for the deployable; Gaussian noise), batched latency and file size. Integrated Gradients
explain the fp32 model (kiln.explain).

MLflow: a parent run `evaluate` (the deployable's metrics as they are, the baseline's prefixed `fp32_`, the reports,
the gate's decision) with child runs `baseline` and `deployable` (tag kiln.stage=evaluate-model) that log the same
metric keys and their model: the baseline in the PyTorch flavour, the deployable in the ONNX flavour (what batch
inference loads), registered with lineage tags. Everything is computed before anything is logged and the aliases move
last (kiln.registry.promote); report files move into place only when all of it succeeded.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import onnx
from mlflow import MlflowClient
from mlflow.models import infer_signature

from kiln.config import Params
from kiln.data import load_split, read_manifest, stratified_head, to_float
from kiln.evaluation import Logits, ModelEvaluation, evaluate_model, perturbed_sets, torch_logits
from kiln.explain import save_explanations
from kiln.io import atomic_path, read_json, write_json
from kiln.metrics import confusion
from kiln.models import load_trained_model
from kiln.onnx_tools import measure_latency, onnx_runner
from kiln.plots import save_confusion_matrix, save_reliability_diagram
from kiln.registry import PREDICTIONS, Decision, Gate, predictions_record, promote
from kiln.tracking import lineage_tags, use_experiment

SEED = 0  # the robustness subset, PGD's random start, the noise
EXAMPLE_ROWS = 2  # of the logged input example: torch.export would fix a batch dimension of 1
REPORTS = {"metrics": "metrics.json", "predictions": "predictions.csv", "confusion": "confusion_matrix.png",
           "fp32_confusion": "confusion_matrix_fp32.png", "per_class": "per_class.csv",
           "fp32_reliability": "reliability_fp32.csv", "reliability": "reliability_deployable.csv",
           "reliability_plot": "reliability.png", "explanations": "integrated_gradients.png"}


@dataclass(frozen=True)
class Evaluated:
    role: str  # the child run's name: baseline | deployable
    variant: str  # fp32, or the compress variant deployable.onnx holds
    path: Path
    attack: str  # how its adversarial examples were made: white-box | transfer-from-fp32
    logits: Logits
    result: ModelEvaluation


def deployable_variant(selection_path: Path) -> str:
    """The variant compress selected as deployable, from its selection.json; 'unknown' without one."""
    return read_json(selection_path)["selected_variant"] if selection_path.is_file() else "unknown"


def pinned(*packages: str) -> list[str]:
    """pip requirements pinning the installed versions (MLflow would otherwise infer them, slowly)."""
    return [f"{name}=={version(name)}" for name in packages]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_reports(out: dict[str, Path], models: dict[str, Evaluated], labels: np.ndarray, classes: list[str],
                  summary: dict[str, float]) -> None:
    """Every file of reports/evaluate, at the (temporary) paths in `out`."""
    baseline, deployable = models["baseline"], models["deployable"]
    for key, model in (("fp32_confusion", baseline), ("confusion", deployable)):
        save_confusion_matrix(confusion(labels, model.result.predicted, len(classes)), classes, out[key],
                              f"{model.role} model ({model.variant}), test split")
    write_csv(out["predictions"], ["actual", "predicted"],
              [[classes[a], classes[p]] for a, p in zip(labels, deployable.result.predicted, strict=True)])
    support = np.bincount(labels, minlength=len(classes))
    write_csv(out["per_class"], ["class", "support", "fp32_precision", "fp32_recall", "deployable_precision",
                                 "deployable_recall"],
              [[name, int(support[index]), baseline.result.precision[index], baseline.result.recall[index],
                deployable.result.precision[index], deployable.result.recall[index]]
               for index, name in enumerate(classes)])
    columns = ["lower", "upper", "count", "confidence", "accuracy"]
    for key, model in (("fp32_reliability", baseline), ("reliability", deployable)):
        write_csv(out[key], columns, [[row[column] for column in columns] for row in model.result.calibration.bins])
    save_reliability_diagram({f"{model.role} ({model.variant})": model.result.calibration.bins
                              for model in models.values()},
                             {f"{model.role} ({model.variant})": model.result.calibration.ece
                              for model in models.values()},
                             out["reliability_plot"], "reliability, test split")
    write_json(out["metrics"], summary)


@contextmanager
def child_run(model: Evaluated, tags: dict[str, str], record: dict, confusion_plot: Path) -> Iterator[None]:
    """A nested run for one evaluated model: its metrics (the same keys for every model), params, tags, predictions."""
    tags = {**tags, "kiln.stage": "evaluate-model", "kiln.variant": model.variant, "kiln.attack": model.attack}
    with mlflow.start_run(run_name=model.role, nested=True, tags=tags):
        mlflow.log_params({"variant": model.variant, "model_file": str(model.path), "attack": model.attack})
        mlflow.log_metrics({**model.result.metrics, **model.result.per_class})
        mlflow.log_dict(record, PREDICTIONS)
        mlflow.log_artifact(str(confusion_plot))
        yield


def log_decision(decision: Decision) -> None:
    """The gate's decision on the active run: promotion.json, tags and gate_* metrics."""
    mlflow.log_dict(decision.as_dict(), "promotion.json")
    mlflow.set_tags({"kiln.promoted": str(decision.promoted).lower(), "kiln.promotion_reason": decision.reason,
                     "kiln.model_version": decision.version})
    mlflow.log_metrics({f"gate_{key}": getattr(decision, key) for key in ("delta", "b", "c", "p_value")
                        if getattr(decision, key) is not None})


def run(
    params: Params,
    prepared_dir: Path = Path("data/prepared"),
    model_path: Path = Path("models/model.pt"),
    onnx_path: Path = Path("models/deployable.onnx"),
    report_dir: Path = Path("reports/evaluate"),
    selection_path: Path = Path("reports/compress/selection.json"),
) -> tuple[dict[str, float], Decision]:
    """Evaluate both models, log them, register the deployable one and apply the promotion gate."""
    for path, stage in ((model_path, "train"), (onnx_path, "compress")):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    settings = params.evaluate
    classes = read_manifest(prepared_dir)["classes"]
    x_test, y_test = load_split(prepared_dir, "test")
    images = to_float(x_test)
    fp32_model, saved = load_trained_model(str(model_path))
    variant = deployable_variant(selection_path)

    subset = stratified_head(y_test, settings.robustness_samples, SEED)
    sets = perturbed_sets(fp32_model, images[subset], y_test[subset], settings, source="fp32", seed=SEED)
    batch = np.resize(images, (params.compress.latency_batch_size, *images.shape[1:]))
    candidates = (("baseline", "fp32", model_path, "white-box", torch_logits(fp32_model)),
                  ("deployable", variant, onnx_path, "transfer-from-fp32", onnx_runner(onnx_path)))
    models: dict[str, Evaluated] = {}
    for role, name, path, attack, logits in candidates:
        result = evaluate_model(logits, images, y_test, classes, settings.calibration_bins, sets, y_test[subset])
        timing = measure_latency(logits, batch, params.compress.latency_repeats)
        result.metrics.update({f"latency_batched_{key}": value for key, value in timing.items()})
        result.metrics["model_size_bytes"] = path.stat().st_size
        models[role] = Evaluated(role, name, path, attack, logits, result)
        print(f"evaluate: {role} ({name}) " + " ".join(f"{key}={value:.4g}" for key, value in result.metrics.items()))
    baseline, deployable = models["baseline"], models["deployable"]
    summary = {**deployable.result.metrics, **{f"fp32_{key}": value for key, value in baseline.result.metrics.items()}}

    use_experiment(settings.experiment)
    lineage = {**lineage_tags(params, prepared_dir), "kiln.train_run_id": saved["mlflow_run_id"],
               "kiln.tune_run_id": saved["tune_run_id"]}
    example = images[:EXAMPLE_ROWS]
    gate = Gate(settings.gate_metric, settings.gate_margin, settings.gate_alpha)
    with ExitStack() as stack:  # the reports move into place when the block exits without error
        out = {key: stack.enter_context(atomic_path(report_dir / name)) for key, name in REPORTS.items()}
        write_reports(out, models, y_test, classes, summary)
        save_explanations(fp32_model, images, y_test, classes, settings.explain_steps, out["explanations"])
        with mlflow.start_run(run_name="evaluate", tags={"kiln.stage": "evaluate", "kiln.deployable_variant": variant,
                                                         **lineage}) as parent:
            mlflow.log_params(settings.model_dump())
            mlflow.log_metrics(summary)
            for key in REPORTS:
                mlflow.log_artifact(str(out[key]))
            with child_run(baseline, lineage, predictions_record(x_test, y_test, baseline.result.predicted),
                           out["fp32_confusion"]):
                mlflow.pytorch.log_model(
                    fp32_model, name="model", input_example=example, metadata={"classes": classes},
                    signature=infer_signature(example, baseline.logits(example)),
                    pip_requirements=pinned("torch"),
                )
            with child_run(deployable, lineage, predictions_record(x_test, y_test, deployable.result.predicted),
                           out["confusion"]):
                info = mlflow.onnx.log_model(
                    onnx.load(str(onnx_path)), name="model", input_example=example, metadata={"classes": classes},
                    signature=infer_signature(example, deployable.logits(example)),
                    pip_requirements=pinned("onnx", "onnxruntime"),
                )
                version_tags = {**lineage, "kiln.variant": variant, "kiln.evaluate_run_id": parent.info.run_id}
                registered = mlflow.register_model(info.model_uri, settings.registered_model, tags=version_tags)
                decision = promote(MlflowClient(), settings.registered_model, registered.version, gate)
                log_decision(decision)
            log_decision(decision)
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    print(f"evaluate: test_accuracy={summary['test_accuracy']:.4f} macro_f1={summary['test_macro_f1']:.4f} "
          f"(fp32 {summary['fp32_test_accuracy']:.4f}); registered {settings.registered_model} v{decision.version} "
          f"({variant}) as challenger, {verdict}: {decision.reason}")
    return summary, decision
