"""The evaluate stage's comparison of two models on the test split, and its report files.

Both models (the fp32 baseline and the deployable one) get the same metrics (kiln.evaluate.measures), their batched
latency timed side by side (kiln.core.latency) and their file size.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.core.files import write_json
from kiln.core.inference import Logits
from kiln.core.latency import batch_of, interleaved
from kiln.core.params import LatencyParams
from kiln.evaluate.measures import ModelEvaluation, measure_model
from kiln.evaluate.metrics import confusion
from kiln.evaluate.plots import save_confusion_matrix, save_reliability_diagram

HEADLINE = ("test_accuracy", "test_macro_f1", "test_ece", "latency_batched_p50_ms", "model_size_bytes")
REPORTS = {"metrics": "metrics.json", "models": "models.json", "predictions": "predictions.csv",
           "confusion": "confusion_matrix.png", "fp32_confusion": "confusion_matrix_fp32.png",
           "per_class": "per_class.csv",
           "fp32_reliability": "reliability_fp32.csv", "reliability": "reliability_deployable.csv",
           "reliability_plot": "reliability.png"}


@dataclass(frozen=True)
class Candidate:
    role: str  # the MLflow child run's name: baseline | deployable
    variant: str  # fp32, or the compress variant the deployable file holds
    path: Path
    attack: str  # how its adversarial examples were made: white-box | transfer-from-fp32
    logits: Logits


@dataclass(frozen=True)
class Evaluated:
    candidate: Candidate
    result: ModelEvaluation

    @property
    def label(self) -> str:
        return f"{self.candidate.role} ({self.candidate.variant})"


def evaluate_candidates(candidates: list[Candidate], images: np.ndarray, labels: np.ndarray, classes: list[str],
                        num_bins: int, sets: dict[str, np.ndarray], set_labels: np.ndarray,
                        latency: LatencyParams) -> dict[str, Evaluated]:
    """Every metric of each candidate, plus `latency_batched_*` (timed side by side) and `model_size_bytes`."""
    timings = interleaved({c.role: c.logits for c in candidates}, batch_of(images, latency.batch_size), latency)
    evaluated = {}
    for candidate in candidates:
        result = measure_model(candidate.logits, images, labels, classes, num_bins, sets, set_labels)
        result.metrics.update(timings[candidate.role].as_metrics("latency_batched"))
        result.metrics["model_size_bytes"] = candidate.path.stat().st_size
        evaluated[candidate.role] = Evaluated(candidate, result)
        print(f"evaluate: {candidate.role} ({candidate.variant}) "
              + " ".join(f"{key}={value:.4g}" for key, value in result.metrics.items()))
    return evaluated


def summary_metrics(models: dict[str, Evaluated], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """The deployable model's metrics as they are, the baseline's prefixed `fp32_`: all of them, or `keys` only."""
    baseline, deployable = models["baseline"].result.metrics, models["deployable"].result.metrics
    return {**{key: value for key, value in deployable.items() if keys is None or key in keys},
            **{f"fp32_{key}": value for key, value in baseline.items() if keys is None or key in keys}}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_reports(out: dict[str, Path], models: dict[str, Evaluated], labels: np.ndarray, classes: list[str]) -> None:
    """Every file of REPORTS, at the (temporary) paths in `out`: metrics.json holds the
    HEADLINE metrics of both models (`dvc metrics show`), models.json all of them."""
    baseline, deployable = models["baseline"], models["deployable"]
    for key, model in (("fp32_confusion", baseline), ("confusion", deployable)):
        save_confusion_matrix(confusion(labels, model.result.predicted, len(classes)), classes, out[key],
                              f"{model.candidate.role} model ({model.candidate.variant}), test split")
    _write_csv(out["predictions"], ["actual", "predicted"],
               [[classes[a], classes[p]] for a, p in zip(labels, deployable.result.predicted, strict=True)])
    support = np.bincount(labels, minlength=len(classes))
    _write_csv(out["per_class"], ["class", "support", "fp32_precision", "fp32_recall", "deployable_precision",
                                  "deployable_recall"],
               [[name, int(support[index]), baseline.result.precision[index], baseline.result.recall[index],
                 deployable.result.precision[index], deployable.result.recall[index]]
                for index, name in enumerate(classes)])
    columns = ["lower", "upper", "count", "confidence", "accuracy"]
    for key, model in (("fp32_reliability", baseline), ("reliability", deployable)):
        _write_csv(out[key], columns, [[row[column] for column in columns] for row in model.result.calibration.bins])
    save_reliability_diagram({model.label: model.result.calibration.bins for model in models.values()},
                             {model.label: model.result.calibration.ece for model in models.values()},
                             out["reliability_plot"], "reliability, test split")
    write_json(out["metrics"], summary_metrics(models, HEADLINE))
    write_json(out["models"], {role: {"variant": model.candidate.variant, "metrics": model.result.metrics,
                                      "per_class": model.result.per_class} for role, model in models.items()})
