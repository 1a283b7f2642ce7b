"""Benchmark multi-task training: one trunk with a Fashion-MNIST head and a digits head against the two single-task
models with the same trunk and the same total training budget, over several seeds.

    python -m benchmarks.multitask     # ~25 min on 2 CPU cores; writes benchmarks/results/multitask.json and the
                                       # multitask table in docs/benchmarks.md

Both datasets are prepared at Fashion-MNIST's 28x28 (digits upsampled). Every model is the train stage's dvc.yaml
command on params.yaml's stock recipe and model with `epochs` epochs (no tuned values), seeded by `train.seed`: the
single-task runs train `epochs` passes over their own training split, the multi-task run (proportional sampling,
equal loss weights) `epochs` passes over both together, so its images seen equal the two single runs' sum. Each
model's test accuracy is measured per task in this process; inference cost is the torch eager time of one batch
through the multi-task model (both tasks' predictions) against one batch through each single-task model (their sum),
timed in interleaved rounds, and their parameters and MACs.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import typer

from benchmarks.report import machine, measured_code, write_results, write_section
from benchmarks.stages import run_stage
from kiln.compress.pruning import count_macs, count_parameters
from kiln.core.inference import torch_logits
from kiln.core.latency import batch_of, interleaved
from kiln.core.models import TaskHead, load_trained_model, task_heads
from kiln.core.params import apply_overrides, read_raw_params, validate_params
from kiln.core.prepared import load_split, task_folders, to_float
from kiln.train.loop import VAL_BATCH, validate
from kiln.train.recipe import make_loader

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("fashion_mnist", "digits")
SIDE = 28


def train_model(raw: dict[str, Any], name: str, overrides: dict[str, Any], seed: int, work: Path) -> Path:
    """Prepare and train one model (`overrides` on the benchmark's params) with `seed`; returns the model file."""
    params = apply_overrides(raw, {**overrides, "train.seed": seed})
    folder = work / f"seed{seed}" / name
    run_stage("prepare", params, {"out": folder / "prepared"}, work)
    run_stage("train", params, {"data": folder / "prepared", "best_config": folder / "unused.json",
                                "model": folder / "model.pt", "reports": folder / "reports"}, work)
    return folder


def test_accuracies(folder: Path) -> dict[str, float]:
    """The trained model's test accuracy on each of its tasks (a multi-task model's heads, one by one)."""
    model, _ = load_trained_model(str(folder / "model.pt"))
    heads, accuracies, start = task_heads(model), {}, 0
    for task, task_folder in task_folders(folder / "prepared").items():
        count = heads.get(task)
        head = model if count is None else TaskHead(model, slice(start, start + count))
        start += count or 0
        accuracies[task] = validate(head, make_loader(*load_split(task_folder, "test"), VAL_BATCH, False, 0)).accuracy
    return accuracies


def inference_cost(folders: dict[str, Path], latency: Any) -> dict[str, Any]:
    """Parameters, MACs and batched torch eager p50 of the multi-task model against the two single-task models
    together (timed side by side in interleaved rounds)."""
    models = {name: load_trained_model(str(folder / "model.pt"))[0] for name, folder in folders.items()}
    images = to_float(load_split(folders["multitask"] / "prepared", "test")[0][: latency.batch_size * 4])
    example = torch.from_numpy(images[:1])
    runners = {name: torch_logits(model) for name, model in models.items()}
    timing = interleaved(runners, batch_of(images, latency.batch_size), latency)
    singles = [f"single_{task}" for task in TASKS]
    return {"multitask_parameters": count_parameters(models["multitask"]),
            "single_parameters": sum(count_parameters(models[name]) for name in singles),
            "multitask_macs": count_macs(models["multitask"], example),
            "single_macs": sum(count_macs(models[name], example) for name in singles),
            "multitask_batched_p50_ms": timing["multitask"].median_ms,
            "single_batched_p50_ms": sum(timing[name].median_ms for name in singles)}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": min(values), "max": max(values)}


def main(seeds: int = 3, epochs: int = 6) -> None:
    """Train the multi-task model and both single-task models on every seed, and compare them."""
    code = measured_code("multitask")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-multitask-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    raw = apply_overrides(read_raw_params(ROOT / "params.yaml"), {
        "prepare.image_side": SIDE, "train.epochs": epochs, "train.use_tuned": False,
        "compress.variants": ["fp32", "int8"],  # what a multi-task model compresses to (params' check)
        "train.storage_path": str(work / "ray_results")})
    runs = {"multitask": {"prepare.dataset": TASKS[0], "train.tasks": dict.fromkeys(TASKS, 1.0)},
            **{f"single_{task}": {"prepare.dataset": task} for task in TASKS}}
    per_seed, costs = {}, []
    for seed in range(seeds):
        folders = {name: train_model(raw, name, overrides, seed, work) for name, overrides in runs.items()}
        per_seed[seed] = {name: test_accuracies(folder) for name, folder in folders.items()}
        costs.append(inference_cost(folders, validate_params(raw).latency))
        print(f"bench: seed {seed}: " + ", ".join(f"{name} {accuracy}" for name, accuracy in per_seed[seed].items()),
              flush=True)
    accuracy = {f"{kind}_{task}_accuracy": spread([per_seed[seed][name][task] for seed in per_seed])
                for task in TASKS for kind, name in (("multitask", "multitask"), ("single", f"single_{task}"))}
    cost = {key: statistics.median(entry[key] for entry in costs) for key in costs[0]}
    results = {
        **{key: round(value["mean"], 4) for key, value in accuracy.items()},
        "parameter_ratio": round(cost["multitask_parameters"] / cost["single_parameters"], 4),
        "macs_ratio": round(cost["multitask_macs"] / cost["single_macs"], 4),
        "inference_time_ratio": round(cost["multitask_batched_p50_ms"] / cost["single_batched_p50_ms"], 4),
        "accuracy": accuracy, "per_seed": per_seed, "cost": cost, "seeds": list(per_seed),
        "setup": (f"Fashion-MNIST and digits at {SIDE}x{SIDE}, {validate_params(raw).train.model} trunk, stock recipe, "
                  f"{epochs} epochs (multi-task: over both training splits, proportional sampling, equal weights), "
                  f"seeds {list(per_seed)}; inference: torch eager, batch {validate_params(raw).latency.batch_size}"),
        "machine": machine(),
    }
    write_results("multitask", results, code)
    gain = {task: (accuracy[f"multitask_{task}_accuracy"]["mean"] - accuracy[f"single_{task}_accuracy"]["mean"]) * 100
            for task in TASKS}
    rows = [(task, cell(accuracy[f"single_{task}_accuracy"]), cell(accuracy[f"multitask_{task}_accuracy"]),
             f"{gain[task]:+.2f}") for task in TASKS]
    helped = [task for task in TASKS
              if accuracy[f"multitask_{task}_accuracy"]["min"] > accuracy[f"single_{task}_accuracy"]["max"]]
    verdict = (f"helped {', '.join(helped)} on every seed" if helped else
               "helped neither task beyond the range over seeds")
    write_section("multitask", "python -m benchmarks.multitask", results["setup"],
                  ("task", "single-task test accuracy (mean, range)", "multi-task", "difference, points"), rows,
                  f"Sharing the trunk {verdict}; the multi-task model has {results['parameter_ratio']:.2f}x the "
                  f"parameters and {results['macs_ratio']:.2f}x the MACs of the two single-task models together, "
                  f"and answers both tasks in {results['inference_time_ratio']:.2f}x their summed batch time.")


def cell(stats: dict[str, float]) -> str:
    """A table cell: mean (min to max)."""
    return f"{stats['mean']:.4f} ({stats['min']:.4f} to {stats['max']:.4f})"


if __name__ == "__main__":
    typer.run(main)
