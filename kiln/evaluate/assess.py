"""Both models of the evaluate stage on one task's test split: every metric, robustness, explanations, and that
task's report files."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kiln.core.inference import Logits, torch_logits
from kiln.core.models import TaskHead
from kiln.core.params import Params
from kiln.core.prepared import load_split, read_manifest, stratified_head, to_float
from kiln.evaluate import explain
from kiln.evaluate.measures import perturbed_sets
from kiln.evaluate.multitask import TaskResult, head_logits
from kiln.evaluate.report import Candidate, evaluate_candidates, write_reports


def assess_task(params: Params, task: str, folder: Path, columns: slice | None, fp32_model: nn.Module,
                deployable_logits: Logits, model: Path, deployable: Path, variant: str,
                out: dict[str, Path]) -> TaskResult:
    """Both models on one task's test split (a multi-task model: its `columns`); its reports written to `out`."""
    settings = params.evaluate
    classes = read_manifest(folder)["classes"]
    x_test, y_test = load_split(folder, "test")
    images = to_float(x_test)
    head = fp32_model if columns is None else TaskHead(fp32_model, columns)
    if columns is not None:
        print(f"evaluate: task {task}, {len(y_test)} test images", flush=True)
    subset = stratified_head(y_test, settings.robustness_samples, settings.seed)
    sets = perturbed_sets(head, images[subset], y_test[subset], settings, source="fp32", seed=settings.seed)
    candidates = [Candidate("baseline", "fp32", model, "white-box", torch_logits(head)),
                  Candidate("deployable", variant, deployable, "transfer-from-fp32",
                            head_logits(deployable_logits, columns))]
    models = evaluate_candidates(candidates, images, y_test, classes, settings.calibration_bins, sets,
                                 y_test[subset], params.latency)
    write_reports(out, models, y_test, classes)
    fidelity = explain.save_explanations(head, images, y_test, classes, settings.explain_steps, settings.seed,
                                         stratified_head(y_test, explain.IMAGES, settings.seed), out)
    return TaskResult(task, models, fidelity, x_test, y_test, classes, 0 if columns is None else columns.start)
