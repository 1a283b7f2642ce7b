"""Classification metrics from labels and predictions."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    return {
        "accuracy": float((labels == predictions).mean()),
        "macro_f1": float(f1_score(labels, predictions, average="macro", labels=range(num_classes))),
    }


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    return confusion_matrix(labels, predictions, labels=range(num_classes))


def per_class_precision_recall(labels: np.ndarray, predictions: np.ndarray,
                               num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of each class (0 where a class is never predicted, or absent)."""
    precision, recall, _, _ = precision_recall_fscore_support(labels, predictions, labels=range(num_classes),
                                                              zero_division=0)
    return precision, recall
