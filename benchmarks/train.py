"""Benchmark the train stage on Fashion-MNIST: Ray Train's overhead against a bare PyTorch loop, two workers against
one on this machine, and the stock params' test accuracy and wall time.

    python -m benchmarks.train       # ~20 min on 2 CPU cores; writes benchmarks/results/train.json and the
                                     # train table in docs/benchmarks.md

Throughput runs share one prepared dataset, the stock model and recipe and the stock batch size; each measures the
images/s of its last epoch (the first pays for warm-up), and the rounds alternate so drift hits all alike. The bare
loop runs in a spawned process of its own, the Ray Train runs in one Ray session. The stock run is the train stage's
dvc.yaml command on params.yaml (tuned values from models/best_config.json when use_tuned is on and the
tune stage has run), then the test split in this process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import ray
import typer

from benchmarks.report import machine, measured_code, write_results, write_section
from benchmarks.stages import run_stage
from kiln.core.models import build_model, load_trained_model, model_spec
from kiln.core.params import EarlyStoppingParams, Params, apply_overrides, read_raw_params, validate_params
from kiln.core.prepared import load_split, read_manifest
from kiln.platform.contract import stage_path
from kiln.train.distributed import TrainConfig, train_worker
from kiln.train.job import RayJob, fit
from kiln.train.loop import VAL_BATCH, train_epoch, validate
from kiln.train.recipe import make_loader, make_optimizer, make_recipe, make_scheduler, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def bare_images_per_second(data: dict[str, Any], spec: dict[str, Any], params: Params, epochs: int) -> float:
    """A plain loop (torch's default threads: all cores): the last epoch's images/s."""
    seed_everything(0)
    model = build_model(**spec)
    recipe = make_recipe(params.train, params.prepare.dataset)
    loader = make_loader(data["x_train"], data["y_train"], params.train.batch_size, True, 0)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe, epochs, len(loader))
    for _ in range(epochs):
        started = time.perf_counter()
        stats = train_epoch(model, loader, optimizer, recipe, scheduler)
        seconds = time.perf_counter() - started
    return stats.images / seconds


def ray_images_per_second(data: dict[str, Any], spec: dict[str, Any], params: Params, epochs: int, workers: int,
                          cpus_per_worker: int, storage: Path) -> float:
    """Ray Train (DDP) on `workers` workers: the last epoch's images/s over all workers, timed inside the loop."""
    config = TrainConfig(spec, make_recipe(params.train, params.prepare.dataset), params.train.batch_size, epochs, 0,
                         EarlyStoppingParams())
    job = RayJob(str(storage), f"bench-{workers}x{cpus_per_worker}-{time.time_ns()}", workers, cpus_per_worker,
                 use_gpu=False, max_failures=0)
    state = fit(job, train_worker, config, data)
    return state["history"][-1]["images_per_second"]


def throughput(params: Params, prepared: Path, samples: int, epochs: int, rounds: int, storage: Path) -> dict:
    """Median images/s of the bare loop, 1 Ray worker with all cores, and 2 Ray workers with one core each."""
    x_train, y_train = load_split(prepared, "train")
    data = {"x_train": x_train[:samples], "y_train": y_train[:samples], "x_val": x_train[:512], "y_val": y_train[:512]}
    spec = model_spec(params.train.model, read_manifest(prepared), params.train.dropout)
    cores = os.cpu_count() or 1
    runs: dict[str, list[float]] = {"bare": [], "ray_1_worker": [], "ray_2_workers": []}
    # The bare loop runs in a fresh process holding only torch and kiln's loop: in this driver, libraries imported
    # for Ray and MLflow bring their own thread pools, which slowed torch by ~15% when tried.
    bare = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    for index in range(rounds):
        runs["bare"].append(bare.submit(bare_images_per_second, data, spec, params, epochs).result())
        runs["ray_1_worker"].append(ray_images_per_second(data, spec, params, epochs, 1, cores, storage))
        runs["ray_2_workers"].append(ray_images_per_second(data, spec, params, epochs, 2, max(1, cores // 2), storage))
        print(f"bench: round {index + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in runs.items()),
              flush=True)
    bare.shutdown()
    return {name: statistics.median(values) for name, values in runs.items()} | {"runs": runs}


def stock_run(raw: dict[str, Any], prepared: Path, work: Path) -> dict[str, float]:
    """The train stage on the stock params, then the trained model's accuracy on the test split."""
    params = validate_params(raw)
    best = stage_path("train", "best_config", ROOT)
    tuned = params.train.use_tuned and best.is_file()
    if params.train.use_tuned and not tuned:
        print(f"bench: {best} missing (run `dvc repro tune`): training on params.yaml's own values", flush=True)
        raw = apply_overrides(raw, {"train.use_tuned": False})
    seconds = run_stage("train", raw, {"data": prepared, "best_config": best, "model": work / "model.pt",
                                       "reports": work / "reports"}, work)
    final = json.loads((work / "reports" / "metrics.json").read_text())
    model, _ = load_trained_model(str(work / "model.pt"))
    test = validate(model, make_loader(*load_split(prepared, "test"), VAL_BATCH, False, 0))
    return {"test_accuracy": test.accuracy, "val_accuracy": final["val_accuracy"], "wall_seconds": seconds,
            "epochs": int(final["epoch"]), "tuned": tuned}


def main(samples: int = 12000, epochs: int = 2, rounds: int = 3) -> None:
    """Measure throughput ratios on `samples` training images, then the stock run on the full dataset."""
    code = measured_code("train")
    raw = read_raw_params(ROOT / "params.yaml")
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-train-"))
    raw = apply_overrides(raw, {"train.storage_path": str(work / "ray_results")})
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    prepared = stage_path("prepare", "out", ROOT)
    if not (prepared / "manifest.json").is_file():
        prepared = work / "prepared"
        run_stage("prepare", raw, {"out": prepared}, work)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
    speed = throughput(validate_params(raw), prepared, samples, epochs, rounds, work / "ray_results")
    stock = stock_run(raw, prepared, work)
    params = validate_params(raw)
    results = {
        "ray_vs_bare_throughput_ratio": round(speed["ray_1_worker"] / speed["bare"], 4),
        "two_vs_one_worker_throughput_ratio": round(speed["ray_2_workers"] / speed["ray_1_worker"], 4),
        "fashion_mnist_test_accuracy": round(stock["test_accuracy"], 4),
        "train_wall_seconds": round(stock["wall_seconds"], 1),
        "machine": f"{machine()}, Ray {ray.__version__} local, no GPU",
        "images_per_second": {name: round(value, 1) for name, value in speed.items() if name != "runs"},
        "images_per_second_runs": speed["runs"],
        "stock": {**stock, "model": params.train.model, "schedule": params.train.schedule,
                  "workers": params.train.num_workers},
        "setup": f"throughput: {samples} training images, batch {params.train.batch_size}, {params.train.model}, "
                 f"stock recipe, last of {epochs} epochs, median of {rounds} alternating rounds",
    }
    write_results("train", results, code)
    shutil.rmtree(work / "ray_results", ignore_errors=True)
    ips = results["images_per_second"]
    rows = [
        ("bare PyTorch loop, all cores", f"{ips['bare']:.0f} img/s", "1.00 (baseline)"),
        ("Ray Train, 1 worker x all cores", f"{ips['ray_1_worker']:.0f} img/s",
         f"{results['ray_vs_bare_throughput_ratio']:.2f} of bare (target >= 0.95)"),
        ("Ray Train, 2 workers x 1 core", f"{ips['ray_2_workers']:.0f} img/s",
         f"{results['two_vs_one_worker_throughput_ratio']:.2f} of 1 worker"),
        (f"stock params: {params.train.model}, {stock['epochs']} epochs, {params.train.num_workers} workers"
         f"{', tuned' if stock['tuned'] else ''}", f"{stock['wall_seconds']:.0f} s train stage",
         f"test accuracy {stock['test_accuracy']:.4f} (target >= 0.93 in <= 600 s)"),
    ]
    met = stock["test_accuracy"] >= 0.93 and stock["wall_seconds"] <= 600
    verdict = (f"Stock target {'met' if met else 'NOT met'}; Ray-vs-bare target "
               f"{'met' if results['ray_vs_bare_throughput_ratio'] >= 0.95 else 'NOT met'}. No GPU was lent to this "
               "task, so the GPU path (AMP, channels_last, NCCL) is not measured here.")
    write_section("train", "python -m benchmarks.train", results["setup"] + "; " + results["machine"],
                  ("run", "measured", "ratio / result"), rows, verdict)


if __name__ == "__main__":
    typer.run(main)
