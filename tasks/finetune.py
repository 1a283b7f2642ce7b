"""Stage `finetune`: adapt a registered model (finetune.base, an alias or version of tracking.registered_model) to the
target data (--data, finetune_data's) with every method of finetune.methods, compare them, and register the selected
one (finetune.select) as a version of finetune.registered_model, gated like evaluate's.

Its dep --base (evaluate's finetune_base.json: the version finetune.base named when evaluate last ran) changes when
evaluate moves that alias, so `dvc repro` fine-tunes again when `champion` moves; the stage itself resolves the
reference in the registry as it starts. Everything is checked (base, shapes, adapter targets, shots) before Ray
starts (kiln.finetune.target). MLflow: a parent run `finetune` (lineage tags naming the base version) with a child run
per method (its per-epoch curves, trainable parameters and fraction, adapter size, wall time, test accuracy;
kiln.finetune.compare); the selected method's run holds the ONNX model that is registered, with the test predictions
the gate pairs (kiln.finetune.register). Outputs: the merged model (--model, a kiln model file that compress and
evaluate take), its ONNX export (--onnx-model) and the comparison (--reports)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch

from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.export import export_onnx
from kiln.core.files import atomic_path, write_json
from kiln.core.models import save_trained_model
from kiln.core.params import Params
from kiln.core.prepared import to_float
from kiln.core.stage import open_stage, reports_together, stage_run
from kiln.core.tracking import lineage_tags
from kiln.finetune.compare import compare, method_runs, write_comparison
from kiln.finetune.register import register
from kiln.finetune.report import REPORTS, markdown
from kiln.finetune.target import checked_base, load_target, split_note
from kiln.finetune.training import finetune
from kiln.train.job import RayJob


def run(params: Params, base: Path, data: Path, model: Path, onnx_model: Path, reports: Path) -> dict[str, float]:
    """Fine-tune with every method, write the comparison and the selected model, register it; returns its metrics."""
    settings = params.finetune
    if not base.is_file():
        raise InputError(f"{base}: missing; run the evaluate stage first (dvc repro evaluate)")
    target = load_target(data, settings.shots_per_class, settings.seed)
    open_stage(params)
    origin = checked_base(params, target.manifest)
    ray_cluster.join(settings.num_workers * settings.cpus_per_worker, "finetune.num_workers x finetune.cpus_per_worker")
    split, classes = split_note(origin, target.manifest["dataset"]), target.manifest["classes"]
    print(f"finetune: {origin.name} v{origin.version} ({settings.base}) -> {target.manifest['dataset']}, "
          f"{len(target.fit_data['y_train'])} training images ({settings.shots_per_class or 'all'} per class), "
          f"methods {', '.join(settings.methods)}")

    with stage_run("finetune", params, data, tags=origin.tags) as parent:
        mlflow.log_params({key: value for key, value in settings.model_dump(mode="json").items()
                           if key not in ("target", "adapters", "lr")})
        tags = {**lineage_tags(params, data), **origin.tags}
        runs = method_runs(settings, tags)
        job = RayJob(ray_cluster.storage_uri(params.train.storage_path), f"finetune-{parent.info.run_id}",
                     settings.num_workers, settings.cpus_per_worker, False, params.train.max_failures,
                     mlflow.get_tracking_uri(), runs)
        tuned = finetune(origin.model, origin.saved["spec"], len(classes), settings, target.fit_data, job)
        rows = compare(tuned, runs, target.x_test, target.y_test)
        chosen = next(row for row in rows if row["method"] == settings.select)
        metrics = {"test_accuracy": chosen["test_accuracy"]}  # the rest is in methods.json
        with reports_together(reports, REPORTS) as out, atomic_path(model) as model_file, \
                atomic_path(onnx_model) as onnx_file:
            selected = tuned[settings.select].model
            save_trained_model(str(model_file), selected, {**origin.saved["spec"], "num_classes": len(classes)},
                               {"mlflow_run_id": runs[settings.select], "tune_run_id": "",
                                "hyperparameters": {}, "base": origin.tags})
            export_onnx(selected, torch.from_numpy(to_float(target.x_test[:2])), onnx_file)
            write_comparison(out, rows, settings.select, origin.tags, split)
            write_json(out["metrics"], metrics)
            mlflow.log_metrics(metrics)
            decision = register(params, runs[settings.select], onnx_file, model_file, tags, parent.info.run_id,
                                target.x_test, target.y_test, classes)
            write_json(out["registration"], {"registered_model": settings.registered_model, **decision.as_dict()})
    print(markdown(rows, settings.select) + split)
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    print(f"finetune: {settings.select} test_accuracy={chosen['test_accuracy']:.4f} with "
          f"{chosen['trainable_fraction']:.2%} of the weights trained; registered {settings.registered_model} "
          f"v{decision.version} from {origin.name} v{origin.version}, {verdict}: {decision.reason}")
    return metrics
