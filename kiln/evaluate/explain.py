"""Explanations of the fp32 torch model, through captum, with the evidence that they explain it.

Three attribution methods (METHODS): Integrated Gradients, GradientSHAP and LIME on square superpixels. Each gets a
figure (the first test image of each class) and, on a stratified set of test images, two fidelity measures: captum's
`infidelity` (lower is better) and a deletion curve, the accuracy as the most-attributed pixels are blacked out,
against blacking out pixels at random. An attribution that explains the model makes its curve fall faster than
random: a smaller area under it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, Lime
from captum.metrics import infidelity
from torch import nn

from kiln.core.files import write_json
from kiln.evaluate.plots import save_attribution_grid, save_deletion_curves

DELETED_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
SUPERPIXELS_PER_SIDE = 7  # LIME's features: squares of about 1/7 of the image's side (4x4 pixels on 28x28)
LIME_SAMPLES = 256  # perturbed copies of each image LIME fits its linear model on
INFIDELITY_NOISE, INFIDELITY_SAMPLES = 0.01, 16
IMAGES = 100  # the stratified set of test images the fidelity is measured on

Attribute = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _integrated_gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int) -> torch.Tensor:
    return IntegratedGradients(model).attribute(images, baselines=0.0, target=targets, n_steps=steps)


def _gradient_shap(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, steps: int) -> torch.Tensor:
    """Expected gradients over `steps` noisy points between each image and a background of two references: a black
    image and the set's mean image."""
    background = torch.cat([torch.zeros_like(images[:1]), images.mean(0, keepdim=True)])
    return GradientShap(model).attribute(images, baselines=background, n_samples=steps, stdevs=0.05, target=targets)


def superpixels(shape: Sequence[int]) -> torch.Tensor:
    """Feature ids of square patches (side: the image's over SUPERPIXELS_PER_SIDE, at least a pixel) for images of
    `shape` (C, H, W), shared by the channels."""
    height, width = shape[-2:]
    side = max(1, round(min(height, width) / SUPERPIXELS_PER_SIDE))
    rows, cols = torch.meshgrid(torch.arange(height) // side, torch.arange(width) // side, indexing="ij")
    return (rows * -(-width // side) + cols).expand(*shape).unsqueeze(0)


def _lime(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, _steps: int) -> torch.Tensor:
    """LIME per image: a linear model fitted to the model's output on LIME_SAMPLES copies with random superpixels
    blacked out; each pixel gets its superpixel's weight."""
    explainer, mask = Lime(model), superpixels(images.shape[1:])
    return torch.cat([explainer.attribute(image[None], target=int(target), feature_mask=mask, baselines=0.0,
                                          n_samples=LIME_SAMPLES, perturbations_per_eval=LIME_SAMPLES)
                      for image, target in zip(images, targets, strict=True)])


METHODS: dict[str, tuple[str, Attribute]] = {  # key: (the figure's name for it, the attribution)
    "integrated_gradients": ("Integrated Gradients", _integrated_gradients),
    "gradient_shap": ("GradientSHAP", _gradient_shap), "lime": ("LIME", _lime)}
REPORTS = {**{method: f"explanations_{method}.png" for method in METHODS}, "fidelity": "explanations.json",
           "deletion": "deletion_curves.csv", "deletion_plot": "deletion_curves.png"}


def attribute(method: str, model: nn.Module, images: np.ndarray, targets: np.ndarray, steps: int,
              seed: int) -> np.ndarray:
    """Attributions of `method` (a METHODS key) towards `targets`, shaped like `images`; seeded where it samples."""
    torch.manual_seed(seed)
    attributions = METHODS[method][1](model.eval(), torch.from_numpy(images), torch.from_numpy(targets), steps)
    return attributions.detach().numpy().astype(np.float32)


def deletion_curve(model: nn.Module, images: np.ndarray, labels: np.ndarray, order: np.ndarray) -> list[float]:
    """Accuracy on `images` with the first DELETED_FRACTIONS of each image's pixels in `order` (N, H*W) blacked out
    in every channel."""
    pixels = images.shape[-2] * images.shape[-1]
    accuracies = []
    for fraction in DELETED_FRACTIONS:
        deleted = images.reshape(len(images), images.shape[1], pixels).copy()
        for row, drop in enumerate(order[:, : round(fraction * pixels)]):
            deleted[row][:, drop] = 0.0
        with torch.no_grad():
            predicted = model(torch.from_numpy(deleted.reshape(images.shape))).argmax(1).numpy()
        accuracies.append(float((predicted == labels).mean()))
    return accuracies


def area(curve: Sequence[float]) -> float:
    """Area under a deletion curve over DELETED_FRACTIONS, divided by their span: a mean accuracy."""
    return float(np.trapezoid(curve, DELETED_FRACTIONS) / (DELETED_FRACTIONS[-1] - DELETED_FRACTIONS[0]))


def _noise(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    noise = INFIDELITY_NOISE * torch.randn_like(inputs)
    return noise, inputs - noise


def fidelity(model: nn.Module, images: np.ndarray, labels: np.ndarray, steps: int,
             seed: int) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
    """Per method, towards the predicted classes: mean infidelity (captum, normalised attributions) and the deletion
    curve's area; and the curves, the last one `random`."""
    model = model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1)
    scores, curves = {}, {}
    for method in METHODS:
        attributions = attribute(method, model, images, predicted.numpy(), steps, seed)
        torch.manual_seed(seed)
        unfaithful = infidelity(model, _noise, torch.from_numpy(images), torch.from_numpy(attributions),
                                target=predicted, n_perturb_samples=INFIDELITY_SAMPLES, normalize=True)
        order = np.argsort(-attributions.sum(axis=1).reshape(len(images), -1), axis=1, kind="stable")
        curves[method] = deletion_curve(model, images, labels, order)
        scores[method] = {"infidelity": float(unfaithful.mean()), "deletion_area": area(curves[method])}
    pixels = images.shape[-2] * images.shape[-1]
    rng = np.random.default_rng(seed)
    curves["random"] = deletion_curve(model, images, labels, np.stack([rng.permutation(pixels) for _ in images]))
    scores["random"] = {"deletion_area": area(curves["random"])}
    return scores, curves


def first_of_each_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Index of the first item of each class, in class order; classes without items are skipped."""
    return np.array([np.flatnonzero(labels == label)[0] for label in range(num_classes) if (labels == label).any()])


def save_explanations(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], steps: int,
                      seed: int, measured: np.ndarray, out: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Every method's attributions of the first test image of each class towards the predicted class, one grid per
    method; the fidelity of each on the images at indices `measured`, as JSON, CSV and a plot. Files go to `out`'s
    REPORTS keys; returns the fidelity scores."""
    chosen = first_of_each_class(labels, len(classes))
    batch = images[chosen]
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(batch)).argmax(1).numpy()
    for method, (title, _) in METHODS.items():
        save_attribution_grid(batch, attribute(method, model, batch, predicted, steps, seed),
                              [classes[label] for label in labels[chosen]], [classes[label] for label in predicted],
                              out[method], f"{title} towards the predicted class (red: for, blue: against)")
    scores, curves = fidelity(model, images[measured], labels[measured], steps, seed)
    write_json(out["fidelity"], {"images": len(measured), **scores})
    with open(out["deletion"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["deleted_fraction", *curves])
        writer.writerows([fraction, *points] for fraction, *points in zip(DELETED_FRACTIONS, *curves.values(),
                                                                         strict=True))
    labels = {**{method: title for method, (title, _) in METHODS.items()}, "random": "random"}
    save_deletion_curves(DELETED_FRACTIONS, curves, labels, out["deletion_plot"],
                         f"deletion curves: {len(measured)} test images, fp32 model")
    return scores
