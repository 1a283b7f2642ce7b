"""Benchmark the stock model's compression: ONNX Runtime int8 against ORT fp32 and torch eager fp32, and structured
(channel) pruning, timed side by side in one process.

    python -m benchmarks.compress        # a few minutes on 2 CPU cores; needs models/model.pt and data/prepared from
                                         # `dvc repro train`; writes benchmarks/results/compress.json and the compress
                                         # table in docs/benchmarks.md
    python -m benchmarks.compress --model other/model.pt --prepared other/prepared

The variants are built as the compress stage builds them (kiln.compress.variants, with params.yaml's `compress`
section): fp32 exported to ONNX, int8 (static QDQ, per-channel, calibrated on training images) and channel_pruned
(fine-tuned). Latency is measured as the stage measures it (kiln.core.latency: warm-up, then interleaved rounds in
rotating order, `repeats` timed calls each), so load changes on a shared machine hit every engine alike; a speedup is
the median of its per-round ratios, with their range.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import typer

from benchmarks.report import write_results, write_section
from kiln.compress.onnx_export import export_onnx, quantize_int8
from kiln.compress.pruning import count_parameters
from kiln.compress.variants import build_float_models, training_inputs
from kiln.core.contract import stage_path
from kiln.core.inference import accuracy, onnx_logits, torch_logits
from kiln.core.latency import batch_of, interleaved
from kiln.core.models import load_trained_model
from kiln.core.params import LatencyParams, load_params
from kiln.core.prepared import load_split, to_float

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 64)
TARGETS = {  # key: (minimum, what it measures, its per-round range in speedup_ranges)
    "int8_size_ratio": (3.5, "int8 ONNX file smaller than fp32's", None),
    "int8_speedup_vs_ort_fp32": (2.5, "int8 faster than ONNX Runtime fp32 at batch 64", "ort_int8_vs_ort_fp32"),
    "int8_speedup_vs_torch_eager": (10.0, "int8 faster than PyTorch eager fp32 at batch 64", "ort_int8_vs_torch_fp32"),
}
MAX_DROP_POINTS = 0.5
ENGINES = {  # engine: (model, runtime)
    "torch_fp32": ("fp32", "PyTorch eager"), "ort_fp32": ("fp32", "ONNX Runtime"), "ort_int8": ("int8", "ONNX Runtime"),
    "torch_channel_pruned": ("channel_pruned", "PyTorch eager"),
    "ort_channel_pruned": ("channel_pruned", "ONNX Runtime"),
}


def require(path: Path, command: str) -> None:
    if not path.exists():
        raise SystemExit(f"{path}: missing; run `{command}` first (or pass its path)")


def spread(values: list[float] | np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def speedup(p50: dict[str, list[float]], baseline: str, engine: str) -> dict[str, float]:
    """`baseline`'s latency over `engine`'s, per round."""
    return spread(np.array(p50[baseline]) / np.array(p50[engine]))


def ranged(results: dict[str, Any], key: str) -> str:
    bounds = results["speedup_ranges"][key]
    return f" (per round {bounds['min']:.2f}-{bounds['max']:.2f}x)"


def verdicts(results: dict[str, Any]) -> list[str]:
    """One line per target of the issue, met or not, and structured pruning's latency change."""
    lines = [f"- {what}: {results[key]:.2f}x{ranged(results, span) if span else ''}, target >= {minimum:g}x: "
             f"**{'met' if results[key] >= minimum else 'not met'}**" for key, (minimum, what, span) in TARGETS.items()]
    drop = results["int8_accuracy_drop_points"]
    lines.append(f"- int8 test accuracy drop: {drop:.2f} points, target <= {MAX_DROP_POINTS:g}: "
                 f"**{'met' if drop <= MAX_DROP_POINTS else 'not met'}**")
    accuracy = results["test_accuracy"]
    lines.append(f"- structured pruning (channel_pruned, "
                 f"{(accuracy['torch_fp32'] - accuracy['torch_channel_pruned']) * 100:.2f} points below fp32): "
                 f"{results['structured_pruning_speedup_vs_torch_eager']:.2f}x fp32's speed at batch 64 in torch eager"
                 f"{ranged(results, 'torch_channel_pruned_vs_torch_fp32')}, "
                 f"{results['structured_pruning_speedup_vs_ort_fp32']:.2f}x in ONNX Runtime"
                 f"{ranged(results, 'ort_channel_pruned_vs_ort_fp32')}")
    return lines


def table_header() -> list[str]:
    return ["engine", "model", "test acc", "ONNX KB", "params", *(f"b{size} p50 ms" for size in BATCHES),
            f"b{BATCHES[-1]} img/s", "vs torch eager", "vs ORT fp32"]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    rows = []
    size = BATCHES[-1]
    for engine, (name, runtime) in ENGINES.items():
        timings = [results["latency_p50_ms"][f"batch{b}"][engine] for b in BATCHES]
        ratios = [results["speedup_ranges"].get(f"{engine}_vs_{baseline}") for baseline in ("torch_fp32", "ort_fp32")]
        rows.append([runtime, name, f"{results['test_accuracy'][engine]:.4f}",
                     f"{results['onnx_bytes'][name] / 1024:,.0f}", f"{results['parameters'][name]:,}",
                     *(f"{t['median']:.3f} [{t['min']:.3f}-{t['max']:.3f}]" for t in timings),
                     f"{size / timings[-1]['median'] * 1e3:,.0f}",
                     *(f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]" if r else "1x" for r in ratios)])
    return rows


def main(model: Path | None = None, prepared: Path | None = None, rounds: int = 10, repeats: int = 50) -> None:
    """Build fp32, int8 and channel_pruned from `model` (default: the train stage's), then measure accuracy, size and
    latency side by side on `prepared` (default: the prepare stage's)."""
    model = model or stage_path("train", "model", ROOT)
    prepared = prepared or stage_path("prepare", "out", ROOT)
    require(model, "dvc repro train")
    require(prepared, "dvc repro prepare")
    settings = load_params(ROOT / "params.yaml", {"compress.variants": ["fp32", "int8", "channel_pruned"]}).compress
    fp32, saved = load_trained_model(str(model))
    calibration, loader = training_inputs(settings, *load_split(prepared, "train"))
    nets = build_float_models(fp32, settings, loader)
    x_test, y_test = load_split(prepared, "test")
    images = to_float(x_test)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-compress-") as tmp:
        files = {name: Path(tmp) / f"{name}.onnx" for name in ("fp32", "int8", "channel_pruned")}
        for name in ("fp32", "channel_pruned"):
            export_onnx(nets[name], torch.from_numpy(images[:2]), files[name])
        quantize_int8(files["fp32"], files["int8"], calibration)
        runners = {engine: (torch_logits(nets[name]) if runtime == "PyTorch eager" else onnx_logits(files[name]))
                   for engine, (name, runtime) in ENGINES.items()}
        sizes = {name: path.stat().st_size for name, path in files.items()}
    scores = {engine: accuracy(run, images, y_test) for engine, run in runners.items()}
    protocol = LatencyParams(batch_size=BATCHES[-1], rounds=rounds, calls=repeats, warmup_calls=repeats)
    latency = {size: {engine: list(timing.rounds_ms) for engine, timing in
                      interleaved(runners, batch_of(images, size), protocol).items()} for size in BATCHES}
    for engine in runners:
        print(f"bench: {engine:<21} test acc {scores[engine]:.4f}  " + "  ".join(
            f"b{size} p50 {np.median(latency[size][engine]):.3f} ms" for size in BATCHES), flush=True)

    batched = latency[BATCHES[-1]]
    results: dict[str, Any] = {
        "int8_size_ratio": sizes["fp32"] / sizes["int8"],
        "int8_speedup_vs_ort_fp32": speedup(batched, "ort_fp32", "ort_int8")["median"],
        "int8_speedup_vs_torch_eager": speedup(batched, "torch_fp32", "ort_int8")["median"],
        "int8_accuracy_drop_points": (scores["ort_fp32"] - scores["ort_int8"]) * 100,
        "structured_pruning_speedup_vs_torch_eager": speedup(batched, "torch_fp32", "torch_channel_pruned")["median"],
        "structured_pruning_speedup_vs_ort_fp32": speedup(batched, "ort_fp32", "ort_channel_pruned")["median"],
        "speedup_ranges": {f"{engine}_vs_{baseline}": speedup(batched, baseline, engine)
                           for baseline in ("torch_fp32", "ort_fp32") for engine in runners if engine != baseline},
        "test_accuracy": scores,
        "onnx_bytes": sizes,
        "parameters": {name: count_parameters(nets["fp32" if name == "int8" else name]) for name in files},
        "latency_p50_ms": {f"batch{size}": {engine: spread(values) for engine, values in latency[size].items()}
                           for size in BATCHES},
        "rounds": rounds, "repeats": repeats, "model": saved["spec"]["name"],
        "machine": (f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads for torch {torch.__version__} and onnxruntime "
                    f"{ort.__version__}"),
    }
    results["setup"] = (f"Fashion-MNIST test split ({len(y_test)} images), the `{results['model']}` model "
                        f"{model.relative_to(ROOT) if model.is_relative_to(ROOT) else model}; latency p50 over "
                        f"{rounds} interleaved rounds of {repeats} calls after warm-up, median [min-max] of the round "
                        f"p50s; {results['machine']}")
    write_results("compress", results)
    write_section("compress", "python -m benchmarks.compress", results["setup"], table_header(), table_rows(results),
                  "\n".join(verdicts(results)))


if __name__ == "__main__":
    typer.run(main)
