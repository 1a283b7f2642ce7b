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

from contextlib import ExitStack
from pathlib import Path

import mlflow
import torch

from kiln.compress.onnx_export import export_onnx
from kiln.core import ray_cluster
from kiln.core.errors import InputError
from kiln.core.files import atomic_path, write_json
from kiln.core.models import save_trained_model
from kiln.core.params import Params
from kiln.core.prepared import to_float
from kiln.core.tracking import lineage_tags, use_experiment
from kiln.finetune.compare import compare, method_runs, write_comparison
from kiln.finetune.register import register
from kiln.finetune.report import REPORTS, markdown
from kiln.finetune.target import checked_base, load_target
from kiln.finetune.training import finetune


def run(params: Params, base: Path, data: Path, model: Path, onnx_model: Path, reports: Path) -> dict[str, float]:
    """Fine-tune with every method, write the comparison and the selected model, register it; returns its metrics."""
    settings = params.finetune
    if not base.is_file():
        raise InputError(f"{base}: missing; run the evaluate stage first (dvc repro evaluate)")
    target = load_target(data, settings.shots_per_class, settings.seed)
    use_experiment(params.tracking.experiment)
    origin = checked_base(params, target.manifest)
    ray_cluster.connect()
    ray_cluster.require(settings.num_workers * settings.cpus_per_worker,
                        "finetune.num_workers x finetune.cpus_per_worker")
    print(f"finetune: {origin.name} v{origin.version} ({settings.base}) -> {target.manifest['dataset']}, "
          f"{len(target.fit_data['y_train'])} training images ({settings.shots_per_class or 'all'} per class), "
          f"methods {', '.join(settings.methods)}")

    tags, classes = {**lineage_tags(params, data), **origin.tags}, target.manifest["classes"]
    with mlflow.start_run(run_name="finetune", tags={**tags, "kiln.stage": "finetune"}) as parent:
        mlflow.log_params({key: value for key, value in settings.model_dump(mode="json").items()
                           if key not in ("target", "adapters", "lr")})
        runs = method_runs(settings, tags)
        tuned = finetune(origin.model, origin.saved["spec"], len(classes), settings, target.fit_data,
                         ray_cluster.storage_uri(params.train.storage_path), f"finetune-{parent.info.run_id}",
                         mlflow.get_tracking_uri(), runs, params.train.max_failures)
        rows = compare(tuned, runs, target.x_test, target.y_test)
        chosen = next(row for row in rows if row["method"] == settings.select)
        metrics = {"test_accuracy": chosen["test_accuracy"]}  # the rest is in methods.json
        with ExitStack() as stack:  # every output moves into place when the block exits without error
            out = {key: stack.enter_context(atomic_path(reports / name)) for key, name in REPORTS.items()}
            model_file, onnx_file = (stack.enter_context(atomic_path(path)) for path in (model, onnx_model))
            selected = tuned[settings.select].model
            save_trained_model(str(model_file), selected, {**origin.saved["spec"], "num_classes": len(classes)},
                               {"mlflow_run_id": runs[settings.select], "tune_run_id": "",
                                "hyperparameters": {}, "base": origin.tags})
            export_onnx(selected, torch.from_numpy(to_float(target.x_test[:2])), onnx_file)
            write_comparison(out, rows, settings.select, origin.tags)
            write_json(out["metrics"], metrics)
            mlflow.log_metrics(metrics)
            decision = register(params, runs[settings.select], onnx_file, model_file, tags, parent.info.run_id,
                                target.x_test, target.y_test, classes)
            write_json(out["registration"], {"registered_model": settings.registered_model, **decision.as_dict()})
    print(markdown(rows, settings.select), end="")
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    print(f"finetune: {settings.select} test_accuracy={chosen['test_accuracy']:.4f} with "
          f"{chosen['trainable_fraction']:.2%} of the weights trained; registered {settings.registered_model} "
          f"v{decision.version} from {origin.name} v{origin.version}, {verdict}: {decision.reason}")
    return metrics
