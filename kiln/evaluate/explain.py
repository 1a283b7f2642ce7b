"""Integrated Gradients (captum) on the fp32 torch model, for a fixed grid of test images drawn as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import IntegratedGradients
from torch import nn

from kiln.evaluate.plots import save_attribution_grid


def first_of_each_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Index of the first item of each class, in class order; classes without items are skipped."""
    return np.array([np.flatnonzero(labels == label)[0] for label in range(num_classes) if (labels == label).any()])


def integrated_gradients(model: nn.Module, images: np.ndarray, targets: np.ndarray,
                         steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's attribution to the logit of its image's target class, integrated over `steps` points of the
    straight path from a black image (all zeros), and each image's convergence delta (sum of attributions minus the
    logit's change along the path: near 0 when `steps` suffice)."""
    explainer = IntegratedGradients(model.eval())
    attributions, delta = explainer.attribute(torch.from_numpy(images), baselines=0.0,
                                              target=torch.from_numpy(targets), n_steps=steps,
                                              return_convergence_delta=True)
    return attributions.detach().numpy(), delta.detach().numpy()


def save_explanations(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], steps: int,
                      path: Path) -> tuple[int, int]:
    """Integrated Gradients of the first test image of each class towards the class `model` predicts, drawn as one
    grid at `path`; returns its (rows, columns)."""
    chosen = first_of_each_class(labels, len(classes))
    batch = images[chosen]
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(batch)).argmax(1).numpy()
    attributions, _ = integrated_gradients(model, batch, predicted, steps)
    return save_attribution_grid(batch, attributions, [classes[label] for label in labels[chosen]],
                                 [classes[label] for label in predicted], path)
