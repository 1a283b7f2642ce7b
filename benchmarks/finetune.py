"""Benchmark fine-tuning: the stock Fashion-MNIST model adapted to scikit-learn's digits (resized to its 28x28
input) with each method of the stock `finetune` section, at 10 and 50 training images per class, over five seeds of
the shot draw; each run is tested on every digits image outside its shots.

    python -m benchmarks.finetune --model /tmp/kiln-bench-train-*/model.pt   # ~20 min on 2 CPU cores (default
                                    # model: the train stage's); writes benchmarks/results/finetune.json and the
                                    # finetune table in docs/benchmarks.md

Each (shots, seed) is one Ray Train fit of every method (kiln.finetune.training, the stage's code) with the stock
epochs and rates, `scratch` included at the same epoch budget. No choice depends on the held-out images: there is no
early stopping and the last epoch is kept, so a sample of them is the progress lines' validation, and all of them the
test.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import ray
import typer
from scipy import stats

from benchmarks.report import machine, measured_code, write_results, write_section
from kiln.core import ray_cluster
from kiln.core.inference import accuracy, torch_logits
from kiln.core.models import load_trained_model
from kiln.core.params import read_raw_params, validate_params
from kiln.core.prepared import per_class, stratified_head, to_float
from kiln.finetune.training import finetune
from kiln.platform.contract import stage_path
from kiln.prepare.datasets import read_digits, resized
from kiln.train.job import RayJob

ROOT = Path(__file__).resolve().parents[1]
SHOTS = (10, 50)
VAL_IMAGES = 200  # of the held-out images, validated after every epoch for the progress lines
MAX_LORA_FRACTION, MAX_LORA_GAP_POINTS, MIN_SCRATCH_MARGIN_POINTS = 0.05, 1.0, 5.0


def interval(values: list[float]) -> dict[str, float]:
    """Mean with its 95% t-interval over the seeds."""
    mean, half = statistics.mean(values), 0.0
    if len(values) > 1:
        half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half}


def run_seed(base: Any, spec: dict, images: np.ndarray, labels: np.ndarray, shots: int, seed: int,
             work: Path) -> dict[str, dict[str, float]]:
    """Every stock method at `shots` per class on the draw of `seed`; test accuracy on the rest, costs."""
    settings = validate_params(read_raw_params(ROOT / "params.yaml")).finetune
    settings = settings.model_copy(update={"seed": seed, "shots_per_class": shots})
    chosen = per_class(labels, shots, seed)
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    shown = rest[stratified_head(labels[rest], VAL_IMAGES, seed)]  # the progress lines' validation: a sample
    data = {"x_train": images[chosen], "y_train": labels[chosen], "x_val": images[shown], "y_val": labels[shown]}
    job = RayJob(str(work / "ray_results"), f"bench-finetune-{shots}-{seed}", settings.num_workers,
                 settings.cpus_per_worker, use_gpu=False, max_failures=0)
    tuned = finetune(base, spec, 10, settings, data, job)
    figures = {}
    for method, result in tuned.items():
        figures[method] = {"accuracy": accuracy(torch_logits(result.model), to_float(images[rest]), labels[rest]),
                           "trainable_fraction": result.trainable_parameters / result.parameters,
                           "wall_seconds": round(result.wall_seconds, 2)}
        print(f"bench: {shots} shots seed {seed} {method}: test {figures[method]['accuracy']:.4f}, "
              f"{figures[method]['trainable_fraction']:.2%} trained, {result.wall_seconds:.1f} s", flush=True)
    return figures


def verdicts(summary: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets at 10 shots, met or by how much they miss."""
    at = {method: figures["accuracy"]["mean"] * 100 for method, figures in summary.items()}
    fraction = summary["lora"]["trainable_fraction"]
    lines = [f"- LoRA trains {fraction:.2%} of the weights (target <= {MAX_LORA_FRACTION:.0%}: "
             f"{'met' if fraction <= MAX_LORA_FRACTION else 'missed'})",
             f"- LoRA {at['lora'] - at['full']:+.2f} points against full fine-tuning (target within "
             f"{MAX_LORA_GAP_POINTS:g}: {'met' if at['full'] - at['lora'] <= MAX_LORA_GAP_POINTS else 'missed'})"]
    for method in ("lora", "full"):
        margin = at[method] - at["scratch"]
        lines.append(f"- {method} {margin:+.2f} points over scratch (target >= {MIN_SCRATCH_MARGIN_POINTS:g}: "
                     f"{'met' if margin >= MIN_SCRATCH_MARGIN_POINTS else 'missed'})")
    return lines


def main(model: Annotated[Path | None, typer.Option(help="The base (a kiln model file; default: train's).")] = None,
         seeds: int = 5) -> None:
    """Fine-tune the base to digits with every stock method, at each shot count and seed."""
    code, started = measured_code("finetune"), time.perf_counter()
    model = model or stage_path("train", "model", ROOT)
    if not model.exists():
        raise SystemExit(f"{model}: missing; run `dvc repro train` (or `python -m benchmarks.train`) first")
    print(f"bench: {machine()}", flush=True)
    base, saved = load_trained_model(str(model))
    images, labels = resized(read_digits(), saved["spec"]["image_size"]).train
    ray_cluster.connect()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-finetune-") as tmp:
        per_seed = {shots: {seed: run_seed(base, saved["spec"], images, labels, shots, seed, Path(tmp))
                            for seed in range(seeds)} for shots in SHOTS}
    ray.shutdown()
    summary = {shots: {method: {"accuracy": interval([runs[seed][method]["accuracy"] for seed in runs]),
                                "trainable_fraction": runs[0][method]["trainable_fraction"],
                                "wall_seconds": statistics.median(runs[seed][method]["wall_seconds"] for seed in runs)}
                       for method in runs[0]} for shots, runs in per_seed.items()}
    ten = summary[SHOTS[0]]
    results: dict[str, Any] = {
        "lora_trainable_fraction": ten["lora"]["trainable_fraction"],
        **{f"{method}_accuracy": ten[method]["accuracy"]["mean"] for method in ("lora", "full", "scratch",
                                                                                 "linear_probe")},
        "summary": summary, "per_seed": per_seed, "seeds": list(range(seeds)), "shots": list(SHOTS),
        "setup": (f"base {model.name} ({saved['spec']['name']}, trained on Fashion-MNIST), target scikit-learn's "
                  f"digits resized to {saved['spec']['image_size']}x{saved['spec']['image_size']} ({len(labels)} "
                  f"images), {', '.join(map(str, SHOTS))} training images per class drawn per seed "
                  f"(seeds 0-{seeds - 1}), tested on every image outside the draw; stock `finetune` methods, epochs "
                  f"and rates"),
        "benchmark_wall_seconds": round(time.perf_counter() - started), "machine": machine(),
    }
    lines = verdicts(ten)
    for line in lines:
        print(f"bench: {line}", flush=True)
    write_results("finetune", results, code)
    rows = [[f"{shots}", method, f"{figures['accuracy']['mean']:.4f} ({figures['accuracy']['low']:.4f} to "
             f"{figures['accuracy']['high']:.4f})", f"{figures['trainable_fraction']:.2%}",
             f"{figures['wall_seconds']:.1f}"] for shots, methods in summary.items()
            for method, figures in methods.items()]
    write_section("finetune", "python -m benchmarks.finetune", results["setup"],
                  ("shots per class", "method", "test accuracy, mean (95% interval)", "trainable", "wall s (median)"),
                  rows, "At 10 shots:\n" + "\n".join(lines))


if __name__ == "__main__":
    typer.run(main)
