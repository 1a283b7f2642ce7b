"""Benchmark the stock model's compression: the compress stage run as `dvc repro` runs it (stock params), its
deployable model timed against ONNX Runtime fp32, int8 and torch eager fp32 side by side on the test split, and
distillation's gain over the same student trained without the teacher, over three seeds.

    python -m benchmarks.compress        # ~20 minutes on 2 CPU cores; needs models/model.pt and data/prepared from
                                         # `dvc repro train`; writes benchmarks/results/compress.json and the compress
                                         # table in docs/benchmarks.md
    python -m benchmarks.compress --model other/model.pt --prepared other/prepared

Latency is measured as the stage measures it (kiln.core.latency: warm-up, then interleaved rounds in rotating order,
`repeats` timed calls each), so load changes on a shared machine hit every engine alike; a speed-up is the median of
its per-round ratios, with their range.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray
import typer

from benchmarks.report import machine, measured_code, write_results, write_section
from benchmarks.stages import run_stage
from kiln.compress.recovery import MAX_FAILURES, recover
from kiln.core import ray_cluster
from kiln.core.inference import accuracy, onnx_logits, torch_logits
from kiln.core.latency import batch_of, interleaved
from kiln.core.models import load_trained_model
from kiln.core.params import LatencyParams, read_raw_params, validate_params
from kiln.core.prepared import load_split, read_manifest, to_float
from kiln.platform.contract import stage_path
from kiln.train.job import RayJob

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)
SEEDS = (0, 1, 2)
TARGETS = {  # key: (minimum, what it measures)
    "deployable_macs_ratio": (2.0, "deployable: fewer MACs than fp32 (times)"),
    "deployable_speedup_vs_ort_fp32_b64": (1.5, "deployable: faster than ONNX Runtime fp32 at batch 64"),
    "deployable_speedup_vs_ort_fp32_b1": (1.2, "deployable: faster than ONNX Runtime fp32 at batch 1"),
    "kd_gain_points": (0.5, "distilled student over the same student without the teacher (test points, median)"),
}
MAX_DROP_POINTS = 0.5
ENGINES = {  # engine: (model file or module, runtime)
    "torch_fp32": ("model.pt", "PyTorch eager"), "ort_fp32": ("model_fp32.onnx", "ONNX Runtime"),
    "ort_int8": ("model_int8.onnx", "ONNX Runtime"), "ort_deployable": ("deployable.onnx", "ONNX Runtime"),
}


def require(path: Path, command: str) -> None:
    if not path.exists():
        raise SystemExit(f"{path}: missing; run `{command}` first (or pass its path)")


def spread(values: list[float] | np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def speedups(p50: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Every engine's speed-up over ONNX Runtime fp32, per round."""
    return {engine: spread(np.array(p50["ort_fp32"]) / np.array(times)) for engine, times in p50.items()}


def run_compress_stage(model: Path, prepared: Path, work: Path) -> tuple[float, dict[str, Any]]:
    """The compress stage on the stock params, as `dvc repro compress` runs it (its own MLflow store); returns its
    wall time and its variants table."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    raw = read_raw_params(ROOT / "params.yaml")
    raw["train"]["storage_path"] = str(work / "ray_results")
    seconds = run_stage("compress", raw, {"model": model, "data": prepared, "onnx_dir": work,
                                          "reports": work / "reports"}, work)
    return seconds, json.loads((work / "reports" / "variants.json").read_text())


def kd_gain(model: Path, prepared: Path, work: Path) -> dict[str, Any]:
    """The stock `distilled` student and its control (`student`: same architecture, initialisation, data and epochs,
    no teacher), trained for each seed in SEEDS; test accuracy of each."""
    trained, saved = load_trained_model(str(model))
    x_train, y_train = load_split(prepared, "train")
    x_val, y_val = load_split(prepared, "val")
    x_test, y_test = load_split(prepared, "test")
    data = {"x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}
    params = validate_params(read_raw_params(ROOT / "params.yaml"))
    stock, augment = params.compress, params.train.augmentation[read_manifest(prepared)["dataset"]]
    ray_cluster.connect()
    scores: dict[str, list[float]] = {"distilled": [], "student": []}
    for seed in SEEDS:
        settings = stock.model_copy(update={"seed": seed})
        job = RayJob(str(work / "ray_results"), f"bench-kd-{seed}", settings.num_workers, settings.cpus_per_worker,
                     use_gpu=False, max_failures=MAX_FAILURES)
        models = recover(trained, saved["spec"], ["distilled", "student"], settings, augment, data, job)
        for name, net in models.items():
            scores[name].append(accuracy(torch_logits(net), to_float(x_test), y_test))
    ray.shutdown()
    gains = [(taught - alone) * 100 for taught, alone in zip(scores["distilled"], scores["student"], strict=True)]
    return {"seeds": list(SEEDS), "test_accuracy": scores, "gain_points": gains,
            "epochs": stock.student_epochs, "target_macs_ratio": stock.target_macs_ratio}


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of the issue, met or not."""
    lines = [f"- {what}: {results[key]:.2f}, target >= {minimum:g}: "
             f"**{'met' if results[key] >= minimum else 'not met'}**" for key, (minimum, what) in TARGETS.items()]
    drop = results["deployable_accuracy_drop_points"]
    lines.append(f"- deployable (`{results['deployable_variant']}`) test accuracy drop: {drop:.2f} points, target <= "
                 f"{MAX_DROP_POINTS:g}: **{'met' if drop <= MAX_DROP_POINTS else 'not met'}**")
    lines.append(f"- int8 on this narrow CNN: {results['int8_speedup_vs_ort_fp32']:.2f}x ONNX Runtime fp32 at batch 64 "
                 "(int8 pays on wide convs: see int8_architectures)")
    return lines


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    for engine, (name, runtime) in ENGINES.items():
        timings = [results["latency_p50_ms"][f"batch{size}"][engine] for size in BATCHES]
        ratios = [results["speedup_vs_ort_fp32"][f"batch{size}"][engine] for size in BATCHES]
        rows.append([runtime, name, f"{results['test_accuracy'][engine]:.4f}",
                     *(f"{t['median']:.3f} [{t['min']:.3f}-{t['max']:.3f}]" for t in timings),
                     *(f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]" for r in ratios)])
    return rows


def frontier_rows(variants: list[dict[str, Any]]) -> list[list[str]]:
    """The stage's own table: every variant's val accuracy, MACs and interleaved speed-ups over ORT fp32."""
    return [[row["variant"], f"{row['val_accuracy']:.4f}", f"{row['accuracy_drop_points']:.2f}",
             f"{row['macs_reduction']:.2f}x", f"{row['batch1_speedup_vs_fp32']:.2f}x", f"{row['speedup_vs_fp32']:.2f}x"]
            for row in variants if not row["variant"].startswith("torch_")]


def main(model: Path | None = None, prepared: Path | None = None, rounds: int = 10, repeats: int = 50) -> None:
    """Run the compress stage on `model` (default: the train stage's), time its deployable model side by side on the
    test split of `prepared` (default: the prepare stage's), then measure distillation's gain."""
    code = measured_code("compress")
    model = model or stage_path("train", "model", ROOT)
    prepared = prepared or stage_path("prepare", "out", ROOT)
    require(model, "dvc repro train")
    require(prepared, "dvc repro prepare")
    print(f"bench: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-compress-") as tmp:
        work = Path(tmp)
        seconds, table = run_compress_stage(model, prepared, work)
        runners = {engine: torch_logits(load_trained_model(str(model))[0]) if runtime == "PyTorch eager" else
                   onnx_logits(work / name) for engine, (name, runtime) in ENGINES.items()}
        x_test, y_test = load_split(prepared, "test")
        images = to_float(x_test)
        scores = {engine: accuracy(run, images, y_test) for engine, run in runners.items()}
        protocol = LatencyParams(batch_size=BATCHES[-1], rounds=rounds, calls=repeats, warmup_calls=repeats)
        latency = {size: {engine: list(timing.rounds_ms) for engine, timing in
                          interleaved(runners, batch_of(images, size), protocol).items()} for size in BATCHES}
        del runners
        distillation = kd_gain(model, prepared, work)
    rows = {row["variant"]: row for row in table["variants"]}
    deployable = rows[table["selected_variant"]]
    ratios = {f"batch{size}": speedups(latency[size]) for size in BATCHES}
    results: dict[str, Any] = {
        "deployable_variant": deployable["variant"],
        "deployable_macs_ratio": deployable["macs_reduction"],
        "deployable_speedup_vs_ort_fp32_b64": ratios["batch64"]["ort_deployable"]["median"],
        "deployable_speedup_vs_ort_fp32_b1": ratios["batch1"]["ort_deployable"]["median"],
        "deployable_accuracy_drop_points": (scores["ort_fp32"] - scores["ort_deployable"]) * 100,
        "kd_gain_points": float(np.median(distillation["gain_points"])),
        "compress_wall_seconds": seconds,
        "int8_speedup_vs_ort_fp32": ratios["batch64"]["ort_int8"]["median"],
        "int8_speedup_vs_torch_eager": float(np.median(np.array(latency[64]["torch_fp32"]) /
                                                       np.array(latency[64]["ort_int8"]))),
        "int8_accuracy_drop_points": (scores["ort_fp32"] - scores["ort_int8"]) * 100,
        "int8_size_ratio": rows["fp32"]["onnx_bytes"] / rows["int8"]["onnx_bytes"],
        "distillation": distillation,
        "stage_variants": [row for row in table["variants"] if not row["variant"].startswith("torch_")],
        "test_accuracy": scores,
        "speedup_vs_ort_fp32": ratios,
        "latency_p50_ms": {f"batch{size}": {engine: spread(values) for engine, values in latency[size].items()}
                           for size in BATCHES},
        "rounds": rounds, "repeats": repeats, "machine": machine(),
    }
    results["setup"] = (f"Fashion-MNIST test split ({len(y_test)} images), the stock trained model "
                        f"{model.relative_to(ROOT) if model.is_relative_to(ROOT) else model} and the stock `compress` "
                        f"params (the stage took {seconds:.0f} s); latency p50 over {rounds} interleaved rounds of "
                        f"{repeats} calls after warm-up, median [min-max] of the round p50s; {results['machine']}")
    for line in verdicts(results):
        print(f"bench: {line}", flush=True)
    write_results("compress", results, code)
    header = ["engine", "model", "test acc", *(f"b{size} p50 ms" for size in BATCHES),
              *(f"b{size} vs ORT fp32" for size in BATCHES)]
    frontier = ["", "The stage's variants (val split, its own interleaved timing):", "",
                "| variant | val acc | drop (pts) | MACs cut | b1 speedup | b64 speedup |", "| --- " * 6 + "|",
                *("| " + " | ".join(row) + " |" for row in frontier_rows(results["stage_variants"]))]
    gains = ", ".join(f"{gain:+.2f}" for gain in distillation["gain_points"])
    write_section("compress", "python -m benchmarks.compress", results["setup"], header, table_rows(results),
                  "\n".join([*verdicts(results), f"- distillation gain per seed (points): {gains}", *frontier]))


if __name__ == "__main__":
    typer.run(main)
