"""The compression variants: build the float models params ask for, export and quantize them, measure them side by
side, and tabulate them.

Float variants: `fp32` (the trained model) and the structured ones of kiln.compress.recovery (`pruned`, `pruned_kd`,
`distilled`, `student`: smaller dense networks at `target_macs_ratio` of fp32's MACs, trained in one Ray Train fit);
`X_int8` is X exported to ONNX and int8-quantized (`int8` is fp32's). ONNX Runtime's int8 kernels pay on wide convs
and lose on narrow ones (docs/benchmarks.md), so the table keeps both and the selection takes what is faster.

Every variant is measured in one process on the val split: accuracy, MACs, ONNX file size, parameters and ONNX Runtime
latency at batch 1 and `latency.batch_size`, interleaved with torch eager fp32 (kiln.core.latency).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kiln.compress.catalog import BASELINE, RECOVERED, float_source
from kiln.compress.pruning import count_macs, count_parameters
from kiln.compress.quantize import quantize_int8
from kiln.compress.recovery import recover
from kiln.compress.select import Selection
from kiln.core.export import export_onnx
from kiln.core.inference import Logits, onnx_logits, torch_logits
from kiln.core.latency import Timing, batch_of, interleaved
from kiln.core.params import AugmentParams, CompressParams, LatencyParams
from kiln.core.prepared import stratified_head, to_float
from kiln.train.job import RayJob

EAGER = ("fp32",)  # float variants also timed in torch eager, for comparison


def calibration_images(settings: CompressParams, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """int8 calibration images (float32): a stratified subset of the training split."""
    return to_float(images[stratified_head(labels, settings.calibration_samples, settings.seed)])


def recovered_variants(variants: list[str]) -> list[str]:
    """The float variants of RECOVERED that `variants` need, in RECOVERED's order."""
    needed = {float_source(variant) for variant in variants}
    return [name for name in RECOVERED if name in needed]


def build_float_models(trained: nn.Module, spec: dict[str, Any], settings: CompressParams, augment: AugmentParams,
                       data: dict[str, np.ndarray], job: RayJob) -> dict[str, nn.Module]:
    """The trained model as `fp32` and the recovered models `settings.variants` need (one Ray Train fit, logging each
    one's curves to its MLflow run)."""
    needed = recovered_variants(settings.variants)
    recovered = recover(trained, spec, needed, settings, augment, data, job) if needed else {}
    return {BASELINE: trained.eval(), **recovered}


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
                     score: Callable[[Logits], float],
                     latency: LatencyParams) -> tuple[list[dict[str, Any]], dict[str, Timing]]:
    """One row per variant (`score`'s validation accuracy, MACs, size, parameters, timings on `images`, ratios to
    fp32), torch eager rows keyed `torch_<name>`, and the batched timings the selection compares."""
    example = torch.from_numpy(images[:1])
    macs = {name: count_macs(model, example) for name, model in floats.items()}  # once per float model, not per row
    runners = {variant: onnx_logits(files[variant]) for variant in variants}
    runners.update({f"torch_{name}": torch_logits(floats[name]) for name in EAGER if name in floats})
    timings = {label: interleaved(runners, batch_of(images, size), latency)
               for label, size in (("batch1", 1), ("batched", latency.batch_size))}
    rows = []
    for name, run in runners.items():
        source = float_source(name.removeprefix("torch_"))
        row = {"variant": name, "val_accuracy": score(run),
               "onnx_bytes": files[name].stat().st_size if name in files else 0,
               "parameters": count_parameters(floats[source]), "macs": macs[source]}
        for label, by_name in timings.items():
            row.update(by_name[name].as_metrics(label))
        rows.append(row)
    baseline = rows[0]
    for row in rows:
        row.update(accuracy_drop_points=(baseline["val_accuracy"] - row["val_accuracy"]) * 100,
                   speedup_vs_fp32=baseline["batched_p50_ms"] / row["batched_p50_ms"],
                   batch1_speedup_vs_fp32=baseline["batch1_p50_ms"] / row["batch1_p50_ms"],
                   macs_reduction=baseline["macs"] / row["macs"],
                   size_ratio_vs_fp32=baseline["onnx_bytes"] / row["onnx_bytes"] if row["onnx_bytes"] else 0.0)
    return rows, timings["batched"]


def variants_markdown(rows: list[dict[str, Any]], selection: Selection, batch_size: int) -> str:
    """The variants table in markdown (median and [fastest-slowest] round), with the selection rule under it."""
    header = ["variant", "val acc", "drop (pts)", "MACs", "MACs cut", "ONNX KB", "params", "b1 p50 ms", "b1 speedup",
              f"b{batch_size} p50 ms [rounds]", f"b{batch_size} img/s", f"b{batch_size} speedup", "deployable"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['val_accuracy']:.4f}", f"{row['accuracy_drop_points']:.2f}",
                 f"{row['macs'] / 1e6:.2f}M", f"{row['macs_reduction']:.2f}x",
                 f"{row['onnx_bytes'] / 1024:,.1f}", f"{row['parameters']:,}",
                 f"{row['batch1_p50_ms']:.3f}", f"{row['batch1_speedup_vs_fp32']:.2f}x",
                 f"{row['batched_p50_ms']:.3f} [{row['batched_p50_min_ms']:.3f}-{row['batched_p50_max_ms']:.3f}]",
                 f"{row['batched_images_per_s']:,.0f}", f"{row['speedup_vs_fp32']:.2f}x",
                 "**yes**" if row["variant"] == selection.variant else ""]
        lines.append("| " + " | ".join(cells) + " |")
    notes = (f"Deployable: `{selection.variant}`, by the rule: {selection.rule}. Latency is ONNX Runtime's "
             "(`torch_*` rows: torch eager, for comparison), timed in interleaved rounds. Pruned variants and "
             "students are smaller dense networks (whole channels removed); kiln builds no unstructured sparsity, "
             "which leaves a dense ONNX graph doing the same work and so shrinks nothing and speeds nothing up.")
    return "\n".join(lines) + "\n\n" + notes + "\n"


def stage_metrics(rows: list[dict[str, Any]], deployable: str) -> dict[str, float]:
    """The headline numbers of metrics.json (`dvc metrics show`): the deployable variant's accuracy, MACs and speed
    against fp32, and int8's accuracy, size and speed against ONNX Runtime fp32. Every variant's figures (size, torch
    eager) are in variants.json and its MLflow run."""
    by_name = {row["variant"]: row for row in rows}
    chosen, int8 = by_name[deployable], by_name["int8"]
    return {"deployable_val_accuracy": chosen["val_accuracy"],
            "deployable_accuracy_drop_points": chosen["accuracy_drop_points"],
            "deployable_macs_reduction": chosen["macs_reduction"],
            "deployable_speedup_vs_fp32": chosen["speedup_vs_fp32"],
            "deployable_batch1_speedup_vs_fp32": chosen["batch1_speedup_vs_fp32"],
            "int8_accuracy_drop_points": int8["accuracy_drop_points"], "int8_size_ratio": int8["size_ratio_vs_fp32"],
            "int8_speedup_vs_ort_fp32": int8["speedup_vs_fp32"]}
