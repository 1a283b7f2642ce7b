"""Stage `compress`: build the compression variants params ask for, measure them side by side, pick the deployable.

Float variants: `fp32` (the trained model), `pruned` (global magnitude pruning to `sparsity`, fine-tuned),
`channel_pruned` (a thinner CNN without each conv's lowest-L1 channels, fine-tuned) and `distilled` (a thinner
student trained on the model's softened logits); `X_int8` is X exported to ONNX and int8-quantized (`int8` is fp32's).
Fine-tunes and distillation run in this process on a stratified subset of the training split.

Every variant is measured in this one process on the val split: accuracy, ONNX file size, parameters, sparsity, and
ONNX Runtime latency p50/p95 and throughput at batch 1 and `latency_batch_size`, after warm-up; fp32 and
channel_pruned also in torch eager. The deployable model is the fastest variant at `latency_batch_size` whose accuracy
is within `max_accuracy_drop_points` of fp32's (fp32 always qualifies), provided it is at least `min_speedup` times
faster than fp32; otherwise fp32.

Writes models/model_{fp32,int8}.onnx, models/deployable.onnx and reports/compress/: metrics.json (numbers only),
variants.json and variants.md (the table), selection.json (the chosen variant and why), tradeoff.png. All of them are
written only if every step succeeds, so a failed run leaves the previous ones untouched.

MLflow: a run `compress` (tag kiln.stage=compress, lineage tags) with the compress params, metrics.json's metrics and
the reports, and a nested run per variant (run name and tag kiln.variant = the variant, kiln.stage=compress-variant)
whose metrics have the same keys for every variant, so MLflow's compare view lines them up.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from kiln.compression import channel_prune, count_parameters, distill, magnitude_prune, qualified, select_deployable
from kiln.compression import sparsity as weight_sparsity
from kiln.config import CompressParams, Params
from kiln.data import load_split, stratified_head, to_float
from kiln.errors import InputError
from kiln.evaluation import torch_logits
from kiln.io import atomic_path, write_json
from kiln.models import PLAIN_CNNS, load_trained_model
from kiln.onnx_tools import export_onnx, measure_latency, onnx_runner, predict_batches, quantize_int8
from kiln.plots import save_tradeoff
from kiln.tracking import lineage_tags, use_experiment
from kiln.training import make_loader, seed_everything

SEED = 0  # calibration and fine-tune subsets, shuffling, student initialisation
TIMINGS = tuple(f"{label}_{key}" for label in ("batch1", "batched") for key in ("p50_ms", "p95_ms", "images_per_s"))


def float_source(variant: str) -> str:
    """The float variant `variant` is or quantizes: int8 -> fp32, pruned_int8 -> pruned, pruned -> pruned."""
    return "fp32" if variant == "int8" else variant.removesuffix("_int8")


def training_inputs(settings: CompressParams, prepared_dir: Path) -> tuple[np.ndarray, DataLoader]:
    """Calibration images (float32) and the fine-tune loader: stratified subsets of the training split."""
    x_train, y_train = load_split(prepared_dir, "train")
    calibration = to_float(x_train[stratified_head(y_train, settings.calibration_samples, SEED)])
    subset = stratified_head(y_train, settings.finetune_samples, SEED)
    return calibration, make_loader(x_train[subset], y_train[subset], settings.finetune_batch_size, shuffle=True,
                                    seed=SEED)


def build_float_models(model: nn.Module, params: CompressParams, loader: DataLoader) -> dict[str, nn.Module]:
    """The trained model as `fp32` and the compressed float models that `params.variants` need."""
    builders = {
        "pruned": lambda: magnitude_prune(model, params.sparsity, loader, params.finetune_epochs, params.finetune_lr),
        "channel_pruned": lambda: channel_prune(
            model, params.channel_keep, loader, params.finetune_epochs, params.finetune_lr
        ),
        "distilled": lambda: distill(model, params.student_width, loader, params.distill_epochs, params.distill_lr,
                                     params.distill_temperature, params.distill_alpha),
    }
    needed = {float_source(variant) for variant in params.variants}
    models = {"fp32": model}
    for name, build in builders.items():
        if name in needed:
            seed_everything(SEED)
            models[name] = build()
    return models


def measure(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray, big_batch: np.ndarray,
            repeats: int) -> dict[str, float]:
    """Val accuracy of `run`, then its latency at batch 1 and at batch len(big_batch), each after warm-up."""
    result = {"val_accuracy": float((predict_batches(run, images).argmax(1) == labels).mean())}
    for label, batch in (("batch1", images[:1]), ("batched", big_batch)):
        result.update({f"{label}_{key}": value for key, value in measure_latency(run, batch, repeats).items()})
    return result


def variants_markdown(rows: list[dict[str, Any]], selected: str, params: CompressParams) -> str:
    """The variants table in markdown, with the selection rule under it."""
    size = params.latency_batch_size
    header = ["variant", "val acc", "drop (pts)", "ONNX KB", "params", "sparsity", "b1 p50 ms", "b1 p95 ms",
              f"b{size} p50 ms", f"b{size} p95 ms", f"b{size} img/s", "speedup", "deployable"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['val_accuracy']:.4f}", f"{row['accuracy_drop_points']:.2f}",
                 f"{row['onnx_bytes'] / 1024:,.1f}", f"{row['parameters']:,}", f"{row['sparsity']:.2f}",
                 f"{row['batch1_p50_ms']:.3f}", f"{row['batch1_p95_ms']:.3f}", f"{row['batched_p50_ms']:.3f}",
                 f"{row['batched_p95_ms']:.3f}", f"{row['batched_images_per_s']:,.0f}",
                 f"{row['speedup_vs_fp32']:.2f}x", "**yes**" if row["variant"] == selected else ""]
        lines.append("| " + " | ".join(cells) + " |")
    rule = (f"Deployable: `{selected}`. The rule: the fastest at batch {size} (ONNX Runtime p50) of the variants "
            f"within {params.max_accuracy_drop_points:g} points of fp32's val accuracy, if it is at least "
            f"{params.min_speedup:g}x faster than fp32; otherwise fp32.")
    return "\n".join(lines) + "\n\n" + rule + "\n"


def log_runs(params: Params, prepared_dir: Path, rows: list[dict[str, Any]], selected: str,
             metrics: dict[str, float], reports: list[Path]) -> None:
    """The `compress` MLflow run (params, metrics, report files) and a nested run per variant with its row's numbers."""
    use_experiment(params.evaluate.experiment)
    tags = lineage_tags(params, prepared_dir)
    with mlflow.start_run(run_name="compress", tags={**tags, "kiln.stage": "compress",
                                                     "kiln.deployable_variant": selected}):
        mlflow.log_params(params.compress.model_dump())
        mlflow.log_metrics(metrics)
        for report in reports:
            mlflow.log_artifact(str(report))
        for row in rows:
            variant = row["variant"]
            with mlflow.start_run(run_name=variant, nested=True, tags={**tags, "kiln.stage": "compress-variant",
                                                                       "kiln.variant": variant}):
                mlflow.log_params({"variant": variant, "float_source": float_source(variant)})
                mlflow.log_metrics({key: float(value) for key, value in row.items() if key != "variant"})


def compress(
    params: Params,
    model_path: Path = Path("models/model.pt"),
    prepared_dir: Path = Path("data/prepared"),
    models_dir: Path = Path("models"),
    report_dir: Path = Path("reports/compress"),
) -> dict[str, float]:
    """Build, export and measure every variant, select the deployable one, write all outputs and log them to MLflow;
    returns the metrics."""
    settings = params.compress
    model, saved = load_trained_model(str(model_path))
    thinned = [variant for variant in settings.variants if float_source(variant) in ("channel_pruned", "distilled")]
    if thinned and saved["spec"]["name"] not in PLAIN_CNNS:
        raise InputError(f"compress.variants: {thinned} build thinner copies of a plain CNN ({', '.join(PLAIN_CNNS)}); "
                         f"the trained model is {saved['spec']['name']!r}")
    calibration, loader = training_inputs(settings, prepared_dir)
    x_val, y_val = load_split(prepared_dir, "val")
    images = to_float(x_val)
    big_batch = np.resize(images, (settings.latency_batch_size, *images.shape[1:]))  # repeats val if it is smaller
    floats = build_float_models(model, settings, loader)

    with tempfile.TemporaryDirectory(prefix="kiln-compress-") as tmp:
        files = {variant: Path(tmp) / f"{variant}.onnx" for variant in (*floats, *settings.variants)}
        for name, net in floats.items():
            export_onnx(net, torch.from_numpy(images[:2]), files[name])
        for variant in settings.variants:
            if variant != float_source(variant):
                quantize_int8(files[float_source(variant)], files[variant], calibration)
        rows = []
        for variant in settings.variants:
            source = floats[float_source(variant)]
            row = {"variant": variant, "onnx_bytes": files[variant].stat().st_size,
                   "parameters": count_parameters(source), "sparsity": weight_sparsity(source),
                   **measure(onnx_runner(files[variant]), images, y_val, big_batch, settings.latency_repeats)}
            rows.append(row)
            print(f"compress: {variant:<20} val acc {row['val_accuracy']:.4f}  {row['onnx_bytes']:>10,} B  "
                  f"{row['parameters']:>8,} params  b{settings.latency_batch_size} p50 {row['batched_p50_ms']:.3f} ms")
        eager = {name: measure(torch_logits(net), images, y_val, big_batch, settings.latency_repeats)
                 for name, net in floats.items() if name in ("fp32", "channel_pruned")}

        by_name = {row["variant"]: row for row in rows}
        baseline = by_name["fp32"]
        for row in rows:
            row.update(accuracy_drop_points=(baseline["val_accuracy"] - row["val_accuracy"]) * 100,
                       speedup_vs_fp32=baseline["batched_p50_ms"] / row["batched_p50_ms"],
                       size_ratio_vs_fp32=baseline["onnx_bytes"] / row["onnx_bytes"])
        accuracy = {row["variant"]: row["val_accuracy"] for row in rows}
        passing = qualified(accuracy, settings.max_accuracy_drop_points)
        selected = select_deployable(accuracy, {row["variant"]: row["batched_p50_ms"] for row in rows},
                                     settings.max_accuracy_drop_points, settings.min_speedup)
        for row in rows:
            row["qualifies"] = row["variant"] in passing

        metrics: dict[str, float] = {"model_pt_bytes": model_path.stat().st_size,
                                     "latency_batch_size": settings.latency_batch_size}
        for row in rows:
            name = row["variant"]
            metrics.update({f"{name}_onnx_bytes": row["onnx_bytes"], f"{name}_parameters": row["parameters"],
                            f"{name}_sparsity": row["sparsity"]})
            metrics.update({f"ort_{name}_{key}": row[key] for key in ("val_accuracy", *TIMINGS)})
        for name, result in eager.items():
            metrics.update({f"torch_{name}_{key}": value for key, value in result.items()})
        int8 = by_name["int8"]
        metrics.update(
            int8_size_ratio=int8["size_ratio_vs_fp32"],
            int8_speedup_vs_ort_fp32=int8["speedup_vs_fp32"],
            int8_speedup_vs_torch_eager=eager["fp32"]["batched_p50_ms"] / int8["batched_p50_ms"],
            int8_accuracy_drop_points=int8["accuracy_drop_points"],
        )
        if "channel_pruned" in eager:
            metrics["structured_pruning_speedup_vs_torch_eager"] = (
                eager["fp32"]["batched_p50_ms"] / eager["channel_pruned"]["batched_p50_ms"]
            )
        chosen = by_name[selected]
        selection = {
            "selected_variant": selected, "path": str(models_dir / "deployable.onnx"),
            "policy": "fastest at latency_batch_size (ONNX Runtime p50) within max_accuracy_drop_points of fp32, "
                      "if at least min_speedup times faster than fp32; else fp32",
            "max_accuracy_drop_points": settings.max_accuracy_drop_points, "min_speedup": settings.min_speedup,
            "qualified": passing,
            **{key: chosen[key] for key in ("val_accuracy", "accuracy_drop_points", "batched_p50_ms",
                                            "speedup_vs_fp32", "size_ratio_vs_fp32")},
        }
        table = variants_markdown(rows, selected, settings)

        targets = {"fp32": models_dir / "model_fp32.onnx", "int8": models_dir / "model_int8.onnx",
                   "deployable": models_dir / "deployable.onnx", "metrics": report_dir / "metrics.json",
                   "variants": report_dir / "variants.json", "markdown": report_dir / "variants.md",
                   "selection": report_dir / "selection.json", "plot": report_dir / "tradeoff.png"}
        with ExitStack() as stack:  # every output moves into place when the block exits without error
            out = {key: stack.enter_context(atomic_path(target)) for key, target in targets.items()}
            for key, variant in (("fp32", "fp32"), ("int8", "int8"), ("deployable", selected)):
                shutil.copyfile(files[variant], out[key])
            write_json(out["metrics"], metrics)
            write_json(out["variants"], {"selected_variant": selected,
                                         "latency_batch_size": settings.latency_batch_size,
                                         "max_accuracy_drop_points": settings.max_accuracy_drop_points,
                                         "variants": rows})
            out["markdown"].write_text(table)
            write_json(out["selection"], selection)
            save_tradeoff(rows, selected, settings.latency_batch_size, out["plot"])
            log_runs(params, prepared_dir, rows, selected, metrics,
                     [out[key] for key in ("metrics", "variants", "markdown", "selection", "plot")])

    print(table, end="")
    print(f"compress: deployable {selected} -> {targets['deployable']} (val acc {chosen['val_accuracy']:.4f}, "
          f"{chosen['speedup_vs_fp32']:.2f}x fp32's batch throughput, {chosen['size_ratio_vs_fp32']:.2f}x smaller)")
    return metrics


def run(params: Params) -> dict[str, float]:
    """The stage as `python -m tasks compress` runs it."""
    return compress(params)
