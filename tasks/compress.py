"""Stage `compress`: build the compression variants params ask for, measure them side by side, ship the deployable one.

Writes, only if every step succeeds: model_fp32.onnx, model_int8.onnx and deployable.onnx into --onnx-dir, and into
--reports metrics.json (numbers), variants.json and variants.md (the table), selection.json (the chosen variant and
the rule) and tradeoff.png. MLflow: a run `compress` with the reports and a nested run per variant whose metrics have
the same keys for every variant, so MLflow's compare view lines them up (recovered variants also get their training
curves there). The variants: kiln.compress.variants; their recovery training: kiln.compress.recovery (Ray Train).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import ray

from kiln.compress.plots import save_tradeoff
from kiln.compress.recovery import MAX_FAILURES
from kiln.compress.select import Selection, select_deployable
from kiln.compress.variants import (
    build_float_models,
    calibration_images,
    export_variants,
    float_source,
    measure_variants,
    recovered_variants,
    stage_metrics,
    variants_markdown,
)
from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.files import write_json
from kiln.core.models import load_trained_model, task_heads
from kiln.core.multitask import load_tasks
from kiln.core.params import Params
from kiln.core.stage import open_stage, reports_together, stage_run
from kiln.core.tracking import lineage_tags
from kiln.train.job import RayJob

ONNX_FILES = {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx", "deployable": "deployable.onnx"}
SELECTION_KEYS = ("val_accuracy", "accuracy_drop_points", "macs_reduction", "batched_p50_ms", "speedup_vs_fp32",
                  "batch1_speedup_vs_fp32", "size_ratio_vs_fp32")
REPORTS = {"metrics": "metrics.json", "variants": "variants.json", "table": "variants.md",
           "selection": "selection.json", "tradeoff": "tradeoff.png"}


def run(params: Params, model: Path, data: Path, onnx_dir: Path, reports: Path) -> dict[str, float]:
    """Build, export and measure every variant, select the deployable one, write and log everything."""
    settings, batch = params.compress, params.latency.batch_size
    trained, saved = load_trained_model(str(model))
    tasks = load_tasks(params, data)
    if set(task_heads(trained)) != set(tasks.layout.names if tasks.layout else ()):
        raise InputError(f"{model}: its heads ({', '.join(task_heads(trained)) or 'one task'}) are not the prepared "
                         f"tasks ({', '.join(tasks.manifests)}); run `dvc repro train`")
    calibration, images = calibration_images(settings, tasks.x_train, tasks.y_train), tasks.val_images()
    cpus = (settings.num_workers * settings.cpus_per_worker, "compress.num_workers x compress.cpus_per_worker")
    open_stage(params, cpus if recovered_variants(settings.variants) else None)
    with stage_run("compress", params, data) as parent:
        runs = variant_runs(settings.variants, lineage_tags(params, data))
        job = RayJob(ray_cluster.storage_uri(params.train.storage_path), f"compress-{parent.info.run_id}",
                     settings.num_workers, settings.cpus_per_worker, False, MAX_FAILURES, mlflow.get_tracking_uri(),
                     runs)
        floats = build_float_models(trained, saved["spec"], settings,
                                    params.train.augmentation[params.prepare.dataset], tasks.arrays(), job)
        ray.shutdown()  # Ray's idle processes would share the CPUs with the latency rounds below
        with tempfile.TemporaryDirectory(prefix="kiln-compress-") as tmp:
            files = export_variants(floats, settings.variants, images[:2], calibration, Path(tmp))
            rows, batched = measure_variants(files, floats, settings.variants, images, tasks.val_accuracy,
                                             params.latency)
            variant_rows = [row for row in rows if row["variant"] in settings.variants]
            selection = select_deployable({row["variant"]: row["val_accuracy"] for row in variant_rows}, batched,
                                          settings.max_accuracy_drop_points, settings.min_speedup)
            metrics = stage_metrics(rows, selection.variant)
            table = variants_markdown(rows, selection, batch)
            chosen = next(row for row in rows if row["variant"] == selection.variant)
            with reports_together(onnx_dir, ONNX_FILES) as onnx, reports_together(reports, REPORTS) as out:
                for key, variant in (("fp32", "fp32"), ("int8", "int8"), ("deployable", selection.variant)):
                    shutil.copyfile(files[variant], onnx[key])
                write_json(out["metrics"], metrics)
                write_json(out["variants"], {"selected_variant": selection.variant, "latency_batch_size": batch,
                                             "variants": rows, "batched_rounds_ms": {
                                                 name: list(timing.rounds_ms) for name, timing in batched.items()}})
                write_json(out["selection"], {"selected_variant": selection.variant, **selection.as_dict(),
                                              **{key: chosen[key] for key in SELECTION_KEYS}})
                out["table"].write_text(table)
                save_tradeoff(variant_rows, selection.variant, batch, out["tradeoff"])
                log_results(params, variant_rows, runs, selection, metrics, list(out.values()))

    print(table, end="")
    print(f"compress: deployable {selection.variant} -> {onnx_dir / ONNX_FILES['deployable']} (val acc "
          f"{chosen['val_accuracy']:.4f}, {chosen['macs_reduction']:.2f}x fewer MACs, {chosen['speedup_vs_fp32']:.2f}x "
          f"fp32's batch-{batch} speed, {chosen['size_ratio_vs_fp32']:.2f}x smaller)")
    return metrics


def variant_runs(variants: list[str], tags: dict[str, str]) -> dict[str, str]:
    """A nested MLflow run per variant under the active `compress` run (recovery training logs its curves there);
    returns their ids by variant."""
    runs = {}
    for variant in variants:
        with mlflow.start_run(run_name=variant, nested=True, tags={**tags, "kiln.stage": "compress-variant",
                                                                   "kiln.variant": variant}) as child:
            mlflow.log_params({"variant": variant, "float_source": float_source(variant)})
            runs[variant] = child.info.run_id
    return runs


def log_results(params: Params, rows: list[dict[str, Any]], runs: dict[str, str], selection: Selection,
                metrics: dict[str, float], reports: list[Path]) -> None:
    """The active `compress` run's params, metrics, reports and decision, and each variant's row in its own run."""
    mlflow.set_tag("kiln.deployable_variant", selection.variant)
    mlflow.log_params({**params.compress.model_dump(), **params.latency.model_dump()})
    mlflow.log_metrics(metrics)
    for report in reports:
        mlflow.log_artifact(str(report))
    for row in rows:
        with mlflow.start_run(run_id=runs[row["variant"]], nested=True):
            mlflow.log_metrics({key: float(value) for key, value in row.items() if key != "variant"})
