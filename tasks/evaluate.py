"""Stage `evaluate`: the fp32 baseline (--model, PyTorch) and the deployable model (--deployable, the ONNX variant
compress selected) on the test split of every task; MLflow logging; registration of the deployable; the promotion gate.

Each task's metrics and reports: kiln.evaluate.assess (a multi-task model's roll-up: kiln.evaluate.multitask). MLflow
and the registry: kiln.evaluate.record. Everything is computed before anything is logged, the aliases move last
(kiln.evaluate.registry.promote), and the report files (with registration.json: the version and the gate's decision,
and finetune_base.json: the version finetune.base names afterwards, the finetune stage's dep) move into place only
when all of it succeeded. The deployable's run also keeps the PyTorch model it was compressed from
(`source/model.pt`), the weights fine-tuning starts from.
"""

from __future__ import annotations

from pathlib import Path

from kiln.core.errors import InputError
from kiln.core.files import read_json, write_json
from kiln.core.inference import onnx_logits
from kiln.core.models import load_trained_model
from kiln.core.params import Params
from kiln.core.prepared import task_folders
from kiln.core.stage import open_stage, reports_together
from kiln.core.tracking import lineage_tags
from kiln.evaluate import explain
from kiln.evaluate.assess import assess_task
from kiln.evaluate.gate import Decision
from kiln.evaluate.multitask import TASK_REPORTS, check_tasks, combined_summary, head_columns, headline, task_reports
from kiln.evaluate.record import REGISTRY_REPORTS, finetune_base, log_and_register
from kiln.evaluate.report import REPORTS


def run(params: Params, data: Path, model: Path, deployable: Path, selection: Path,
        reports: Path) -> tuple[dict[str, float], Decision]:
    """Evaluate both models on every task, log them, register the deployable one and apply the promotion gate."""
    for path, stage in ((model, "train"), (deployable, "compress"), (selection, "compress")):
        if not path.is_file():
            raise InputError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    fp32_model, saved = load_trained_model(str(model))
    folders, columns = task_folders(data), head_columns(fp32_model)  # columns: {} for one task
    check_tasks(model, columns, folders)
    deployable_logits = onnx_logits(deployable)  # a corrupt file fails here, before any work
    open_stage(params)  # so does a tracking server that is down
    variant = read_json(selection)["selected_variant"]
    lineage = {**lineage_tags(params, data), "kiln.train_run_id": saved["mlflow_run_id"],
               "kiln.tune_run_id": saved["tune_run_id"]}
    with reports_together(reports, {**REPORTS, **explain.REPORTS, **REGISTRY_REPORTS, "others": TASK_REPORTS}) as out:
        others = out.pop("others")  # the other tasks' reports (multi-task), a folder
        others.mkdir()
        results = [assess_task(params, task, folder, columns.get(task), fp32_model, deployable_logits, model,
                               deployable, variant, out if index == 0 else task_reports(others / task))
                   for index, (task, folder) in enumerate(folders.items())]
        if len(results) > 1:
            write_json(out["metrics"], headline(combined_summary(results), results))
        decision = log_and_register(params, results, fp32_model, deployable_logits, columns, lineage, out, others)
        name = params.tracking.registered_model
        write_json(out["registration"], {"registered_model": name, **decision.as_dict()})
        write_json(out["finetune_base"], finetune_base(name, params.finetune.base))
    summary = combined_summary(results)
    verdict = "promoted to champion" if decision.promoted else f"champion stays v{decision.champion_version}"
    per_task = "".join(f" {r.task} {summary[f'test_accuracy_{r.task}']:.4f}" for r in results if len(results) > 1)
    print(f"evaluate: test_accuracy={summary['test_accuracy']:.4f}{per_task} macro_f1={summary['test_macro_f1']:.4f} "
          f"(fp32 {summary['fp32_test_accuracy']:.4f}); registered {params.tracking.registered_model} "
          f"v{decision.version} ({variant}) as challenger, {verdict}: {decision.reason}")
    return summary, decision
