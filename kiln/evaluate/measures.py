"""Evaluation beyond accuracy for any classifier given as a logits function: per-class precision and recall,
calibration (expected calibration error and reliability-diagram bins) and robustness.

Adversarial examples need gradients, so they are crafted on the fp32 torch model (kiln.core.adversarial). For that model
the attack is white-box; any other model scored on the same examples (the int8 ONNX deployable has no gradients) faces
a transfer attack. The set names say where the examples came from: `fgsm_from_fp32_eps0.05`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from scipy.special import softmax
from torch import nn

from kiln.core.adversarial import fgsm, pgd
from kiln.core.inference import Logits, predict_batches
from kiln.core.params import EvaluateParams
from kiln.evaluate.metrics import classification_metrics, per_class_precision_recall

CRAFT_BATCH = 500  # images per attack step, to bound memory


@dataclass(frozen=True)
class Calibration:
    ece: float
    bins: list[dict[str, float]]  # the non-empty bins: lower, upper, count, confidence (mean), accuracy


def calibration(probabilities: np.ndarray, labels: np.ndarray, num_bins: int) -> Calibration:
    """Expected calibration error over `num_bins` equal-width bins of top-class confidence, and the bins.

    ECE = sum over bins of (share of items in the bin) x |accuracy in the bin - mean confidence in the bin|.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)  # bin i holds (edges[i], edges[i + 1]]
    bins, ece = [], 0.0
    for index in np.unique(which):
        members = which == index
        mean_confidence, accuracy = float(confidence[members].mean()), float(correct[members].mean())
        ece += members.mean() * abs(accuracy - mean_confidence)
        bins.append({"lower": float(edges[index]), "upper": float(edges[index + 1]), "count": int(members.sum()),
                     "confidence": mean_confidence, "accuracy": accuracy})
    return Calibration(float(ece), bins)


def _craft(attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], images: np.ndarray,
           labels: np.ndarray) -> np.ndarray:
    """`attack(images, labels)` over batches of CRAFT_BATCH."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return torch.cat([attack(xb, yb) for xb, yb in zip(x.split(CRAFT_BATCH), y.split(CRAFT_BATCH), strict=True)]
                     ).numpy()


def perturbed_sets(model: nn.Module, images: np.ndarray, labels: np.ndarray, params: EvaluateParams,
                   source: str = "fp32", seed: int = 0) -> dict[str, np.ndarray]:
    """The images to measure robustness on, by name: `clean`; `fgsm_from_{source}_eps{e}` and
    `pgd_from_{source}_eps{e}`, crafted on `model` (white-box for it, a transfer attack for any other model);
    `noise_sigma{s}`, Gaussian pixel noise. Everything stays in [0, 1]; PGD's start and the noise are seeded."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sets = {"clean": images}
    for epsilon in params.fgsm_epsilons:
        sets[f"fgsm_from_{source}_eps{epsilon:g}"] = _craft(partial(fgsm, model, epsilon=epsilon), images, labels)
    for epsilon in params.pgd_epsilons:
        attack = partial(pgd, model, epsilon=epsilon, steps=params.pgd_steps, generator=generator)
        sets[f"pgd_from_{source}_eps{epsilon:g}"] = _craft(attack, images, labels)
    rng = np.random.default_rng(seed)
    for sigma in params.noise_sigmas:
        sets[f"noise_sigma{sigma:g}"] = np.clip(images + rng.normal(0, sigma, images.shape), 0, 1).astype(np.float32)
    return sets


def robustness(run: Logits, sets: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """Accuracy of `run` on each set of perturbed_sets, as `robust_{name}_accuracy`."""
    return {f"robust_{name}_accuracy": float((predict_batches(run, images).argmax(1) == labels).mean())
            for name, images in sets.items()}


def class_keys(classes: Sequence[str]) -> list[str]:
    """Class names as metric-key fragments ('T-shirt/top' -> 't_shirt_top'), prefixed by index if two coincide."""
    slugs = [re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or str(index) for index, name in enumerate(classes)]
    return slugs if len(set(slugs)) == len(slugs) else [f"{index}_{slug}" for index, slug in enumerate(slugs)]


@dataclass(frozen=True)
class ModelEvaluation:
    metrics: dict[str, float]  # the same keys for every model: test_accuracy, test_macro_f1, test_ece, robust_*
    per_class: dict[str, float]  # test_precision_<class>, test_recall_<class>
    predicted: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    calibration: Calibration


def measure_model(run: Logits, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], num_bins: int,
                   sets: dict[str, np.ndarray], set_labels: np.ndarray) -> ModelEvaluation:
    """Every metric of `run` on the test split (`images`, `labels`), robustness on `sets` (see perturbed_sets)."""
    logits = predict_batches(run, images)
    predicted = logits.argmax(1)
    precision, recall = per_class_precision_recall(labels, predicted, len(classes))
    calibrated = calibration(softmax(logits, axis=1), labels, num_bins)
    metrics = {f"test_{key}": value for key, value in classification_metrics(labels, predicted, len(classes)).items()}
    metrics["test_ece"] = calibrated.ece
    metrics.update(robustness(run, sets, set_labels))
    per_class = {}
    for key, class_precision, class_recall in zip(class_keys(classes), precision, recall, strict=True):
        per_class.update({f"test_precision_{key}": float(class_precision), f"test_recall_{key}": float(class_recall)})
    return ModelEvaluation(metrics, per_class, predicted, precision, recall, calibrated)
