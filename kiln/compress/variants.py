"""The compression variants: build the float models params ask for, export and quantize them, measure them side by
side, and tabulate them.

Float variants: `fp32` (the trained model), `pruned` (global magnitude pruning to `sparsity`, fine-tuned),
`channel_pruned` (a thinner CNN without each conv's lowest-L1 channels, fine-tuned) and `distilled` (a thinner
student trained on the model's softened logits); `X_int8` is X exported to ONNX and int8-quantized (`int8` is
fp32's). Unstructured sparsity (`pruned`) shrinks nothing and speeds nothing up in a dense ONNX graph: it is kept as
a step towards sparse formats, and the selection rule (kiln.compress.select) keeps it from shipping on noise.

Every variant is measured in one process on the val split: accuracy, ONNX file size, parameters, sparsity and ONNX
Runtime latency at batch 1 and `latency.batch_size`, interleaved with torch eager fp32 and channel_pruned
(kiln.core.latency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.compress.distillation import distill
from kiln.compress.onnx_export import export_onnx, quantize_int8
from kiln.compress.pruning import channel_prune, count_parameters, magnitude_prune, sparsity
from kiln.compress.select import BASELINE, Selection
from kiln.core.errors import InputError
from kiln.core.inference import accuracy, onnx_logits, torch_logits
from kiln.core.latency import Timing, batch_of, interleaved
from kiln.core.models import PLAIN_CNNS
from kiln.core.params import CompressParams, LatencyParams
from kiln.core.prepared import stratified_head, to_float
from kiln.train.recipe import make_loader, seed_everything

THINNED = ("channel_pruned", "distilled")  # float variants that rebuild a plain CNN with fewer channels
EAGER = ("fp32", "channel_pruned")  # float variants also timed in torch eager, for comparison


def float_source(variant: str) -> str:
    """The float variant `variant` is or quantizes: int8 -> fp32, pruned_int8 -> pruned, pruned -> pruned."""
    return BASELINE if variant == "int8" else variant.removesuffix("_int8")


def check_supported(variants: list[str], model_name: str) -> None:
    """Raise InputError naming compress.variants when a thinned variant is asked of a model that is not a plain CNN."""
    thinned = [variant for variant in variants if float_source(variant) in THINNED]
    if thinned and model_name not in PLAIN_CNNS:
        raise InputError(f"compress.variants: {thinned} build thinner copies of a plain CNN ({', '.join(PLAIN_CNNS)}); "
                         f"the trained model is {model_name!r}")


def training_inputs(settings: CompressParams, images: np.ndarray,
                    labels: np.ndarray) -> tuple[np.ndarray, DataLoader]:
    """Calibration images (float32) and the fine-tune loader: stratified subsets of the training split."""
    calibration = to_float(images[stratified_head(labels, settings.calibration_samples, settings.seed)])
    subset = stratified_head(labels, settings.finetune_samples, settings.seed)
    return calibration, make_loader(images[subset], labels[subset], settings.finetune_batch_size, shuffle=True,
                                    seed=settings.seed)


def build_float_models(model: nn.Module, settings: CompressParams, loader: DataLoader) -> dict[str, nn.Module]:
    """The trained model as `fp32` and the compressed float models that `settings.variants` need."""
    builders = {
        "pruned": lambda: magnitude_prune(model, settings.sparsity, loader, settings.finetune_epochs,
                                          settings.finetune_lr),
        "channel_pruned": lambda: channel_prune(model, settings.channel_keep, loader, settings.finetune_epochs,
                                                settings.finetune_lr),
        "distilled": lambda: distill(model, settings.student_width, loader, settings.distill_epochs,
                                     settings.distill_lr, settings.distill_temperature, settings.distill_alpha),
    }
    needed = {float_source(variant) for variant in settings.variants}
    models = {BASELINE: model}
    for name, build in builders.items():
        if name in needed:
            seed_everything(settings.seed)
            models[name] = build()
    return models


def export_variants(floats: dict[str, nn.Module], variants: list[str], sample: np.ndarray,
                    calibration: np.ndarray, folder: Path) -> dict[str, Path]:
    """Every float model exported to `folder`/NAME.onnx, and every `X_int8` variant quantized from X's file."""
    files = {name: folder / f"{name}.onnx" for name in (*floats, *variants)}
    for name, net in floats.items():
        export_onnx(net, torch.from_numpy(sample), files[name])
    for variant in variants:
        if variant != float_source(variant):
            quantize_int8(files[float_source(variant)], files[variant], calibration)
    return files


def measure_variants(files: dict[str, Path], floats: dict[str, nn.Module], variants: list[str], images: np.ndarray,
                     labels: np.ndarray, latency: LatencyParams) -> tuple[list[dict[str, Any]], dict[str, Timing]]:
    """One row per variant (accuracy, size, parameters, sparsity, timings, ratios to fp32), torch eager rows keyed
    `torch_<name>`, and the batched timings the selection compares."""
    runners = {variant: onnx_logits(files[variant]) for variant in variants}
    runners.update({f"torch_{name}": torch_logits(floats[name]) for name in EAGER if name in floats})
    timings = {label: interleaved(runners, batch_of(images, size), latency)
               for label, size in (("batch1", 1), ("batched", latency.batch_size))}
    rows = []
    for name, run in runners.items():
        source = floats[float_source(name.removeprefix("torch_"))]
        row = {"variant": name, "val_accuracy": accuracy(run, images, labels),
               "onnx_bytes": files[name].stat().st_size if name in files else 0,
               "parameters": count_parameters(source), "sparsity": sparsity(source)}
        for label, by_name in timings.items():
            row.update(by_name[name].as_metrics(label))
        rows.append(row)
    baseline = rows[0]
    for row in rows:
        row.update(accuracy_drop_points=(baseline["val_accuracy"] - row["val_accuracy"]) * 100,
                   speedup_vs_fp32=baseline["batched_p50_ms"] / row["batched_p50_ms"],
                   size_ratio_vs_fp32=baseline["onnx_bytes"] / row["onnx_bytes"] if row["onnx_bytes"] else 0.0)
    return rows, timings["batched"]


def variants_markdown(rows: list[dict[str, Any]], selection: Selection, batch_size: int) -> str:
    """The variants table in markdown (median and [fastest-slowest] round), with the selection rule under it."""
    header = ["variant", "val acc", "drop (pts)", "ONNX KB", "params", "sparsity", "b1 p50 ms",
              f"b{batch_size} p50 ms [rounds]", f"b{batch_size} img/s", "speedup", "deployable"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['val_accuracy']:.4f}", f"{row['accuracy_drop_points']:.2f}",
                 f"{row['onnx_bytes'] / 1024:,.1f}", f"{row['parameters']:,}", f"{row['sparsity']:.2f}",
                 f"{row['batch1_p50_ms']:.3f}",
                 f"{row['batched_p50_ms']:.3f} [{row['batched_p50_min_ms']:.3f}-{row['batched_p50_max_ms']:.3f}]",
                 f"{row['batched_images_per_s']:,.0f}", f"{row['speedup_vs_fp32']:.2f}x",
                 "**yes**" if row["variant"] == selection.variant else ""]
        lines.append("| " + " | ".join(cells) + " |")
    notes = (f"Deployable: `{selection.variant}`, by the rule: {selection.rule}. Latency is ONNX Runtime's "
             "(`torch_*` rows: torch eager, for comparison), timed in interleaved rounds. Unstructured sparsity "
             "(`pruned`) keeps every weight in a dense ONNX graph: it shrinks nothing and speeds nothing up.")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def stage_metrics(rows: list[dict[str, Any]], deployable: str) -> dict[str, float]:
    """The headline numbers of metrics.json (`dvc metrics show`): the deployable variant's accuracy, speed and size
    against fp32, and int8's against ONNX Runtime fp32 and torch eager fp32. Every variant's figures are in
    variants.json and its MLflow run."""
    by_name = {row["variant"]: row for row in rows}
    chosen, int8, eager = by_name[deployable], by_name["int8"], by_name["torch_fp32"]
    return {"deployable_val_accuracy": chosen["val_accuracy"],
            "deployable_accuracy_drop_points": chosen["accuracy_drop_points"],
            "deployable_speedup_vs_fp32": chosen["speedup_vs_fp32"],
            "deployable_size_ratio_vs_fp32": chosen["size_ratio_vs_fp32"],
            "int8_accuracy_drop_points": int8["accuracy_drop_points"], "int8_size_ratio": int8["size_ratio_vs_fp32"],
            "int8_speedup_vs_ort_fp32": int8["speedup_vs_fp32"],
            "int8_speedup_vs_torch_eager": eager["batched_p50_ms"] / int8["batched_p50_ms"]}
