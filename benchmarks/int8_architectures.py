"""How far ONNX Runtime int8 can get on this CPU, by architecture: the stock `compact` CNN against wider,
strided ones, untrained (speed does not depend on the weights).

    python -m benchmarks.int8_architectures   # ~5 min on 2 CPU cores; needs data/prepared (`dvc repro prepare`);
                                              # writes benchmarks/results/int8_architectures.json and its section
                                              # of docs/benchmarks.md

Each candidate gets the bare training loop's images/s (what a stock run can afford in its time budget) and batch-64
latency of torch eager fp32, ORT fp32 and ORT int8 (quantized as the compress stage does), timed in interleaved rounds
like benchmarks.compress. The question it answers: on which architectures does int8 beat ONNX Runtime fp32 on this
CPU (its flags are in `machine`), and what does the width that needs cost in training speed?
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import typer
from torch import nn

from benchmarks.compress import spread
from benchmarks.report import machine, measured_code, write_results, write_section
from kiln.compress.quantize import quantize_int8
from kiln.core.export import export_onnx
from kiln.core.inference import onnx_logits, torch_logits
from kiln.core.latency import interleaved
from kiln.core.models import Normalize, build_model, conv_bn, model_spec
from kiln.core.params import AugmentParams, LatencyParams
from kiln.core.prepared import load_split, read_manifest, to_float
from kiln.platform.contract import stage_path
from kiln.train.loop import train_epoch
from kiln.train.recipe import Recipe, make_loader, seed_everything

ROOT = Path(__file__).resolve().parents[1]


def _strided(spec: dict, widths: tuple[int, ...], strides: tuple[int, ...]) -> nn.Module:
    """3x3 conv-BN-ReLU blocks that downsample by stride (no max-pooling), global average pooling, one linear."""
    layers: list[nn.Module] = [Normalize(spec["mean"], spec["std"])]
    for inputs, outputs, stride in zip((spec["in_channels"], *widths), widths, strides, strict=False):
        layers += conv_bn(inputs, outputs, stride)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], spec["num_classes"]))


def candidates(spec: dict) -> dict[str, Callable[[], nn.Module]]:
    """The stock model (`spec`: its build_model arguments) and strided, wider alternatives for the same data."""
    return {
        "compact (stock)": lambda: build_model(**spec),
        "strided 32s2-64-128s2, GAP": lambda: _strided(spec, (32, 64, 128), (2, 1, 2)),
        "strided 32s2-64-128s2-128, GAP": lambda: _strided(spec, (32, 64, 128, 128), (2, 1, 2, 1)),
        "strided 64s2-128s2-256, GAP": lambda: _strided(spec, (64, 128, 256), (2, 2, 1)),
    }


def train_images_per_second(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The bare loop's second epoch over `x` (plain SGD steps, batch 128, all cores)."""
    loader = make_loader(x, y, 128, True, 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    plain = Recipe(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", warmup_epochs=0.0,
                   label_smoothing=0.0, augment=AugmentParams(), adversarial="none", adversarial_epsilon=0.0,
                   adversarial_ratio=0.0, pgd_steps=3, amp="none", channels_last=False)
    train_epoch(model, loader, optimizer, plain)
    started = time.perf_counter()
    stats = train_epoch(model, loader, optimizer, plain)
    return stats.images / (time.perf_counter() - started)


def main(prepared: Path | None = None, rounds: int = 5, repeats: int = 30) -> None:
    """Training speed and batch-64 latency of every candidate architecture."""
    code = measured_code("int8_architectures")
    prepared = prepared or stage_path("prepare", "out", ROOT)
    if not (prepared / "manifest.json").is_file():
        raise SystemExit(f"{prepared}: missing; run `dvc repro prepare` first (or pass its path)")
    x, y = load_split(prepared, "train")
    images = np.ascontiguousarray(to_float(x[:512]), dtype=np.float32)
    results = {}
    for name, build in candidates(model_spec("compact", read_manifest(prepared), 0.0)).items():
        seed_everything(0)
        model = build()
        speed = train_images_per_second(model, x[:6144], y[:6144])
        with tempfile.TemporaryDirectory(prefix="kiln-bench-int8-") as tmp:
            fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            export_onnx(model, torch.from_numpy(images[:2]), fp32)
            quantize_int8(fp32, int8, images)
            runners = {"torch_fp32": torch_logits(model), "ort_fp32": onnx_logits(fp32), "ort_int8": onnx_logits(int8)}
            protocol = LatencyParams(batch_size=64, rounds=rounds, calls=repeats, warmup_calls=repeats)
            p50 = {name: list(timing.rounds_ms) for name, timing in interleaved(runners, images[:64], protocol).items()}
        ratios = {f"int8_vs_{base}": spread(np.array(p50[base]) / np.array(p50["ort_int8"]))
                  for base in ("ort_fp32", "torch_fp32")}
        results[name] = {"parameters": sum(p.numel() for p in model.parameters()), "train_images_per_second": speed,
                         "batch64_p50_ms": {engine: spread(values) for engine, values in p50.items()}, **ratios}
        print(f"bench: {name}: train {speed:.0f} img/s, int8 {ratios['int8_vs_ort_fp32']['median']:.2f}x ORT fp32, "
              f"{ratios['int8_vs_torch_fp32']['median']:.2f}x torch eager", flush=True)
    write_results("int8_architectures", {"machine": machine(), "architectures": results}, code)
    stock = results["compact (stock)"]["train_images_per_second"]
    rows = [(name, f"{r['parameters']:,}",
             f"{r['train_images_per_second']:.0f} ({r['train_images_per_second'] / stock:.2f}x)",
             *(f"{r['batch64_p50_ms'][engine]['median']:.2f}" for engine in ("torch_fp32", "ort_fp32", "ort_int8")),
             f"{r['int8_vs_ort_fp32']['median']:.2f}x", f"{r['int8_vs_torch_fp32']['median']:.2f}x")
            for name, r in results.items()]
    best_eager = max(r["int8_vs_torch_fp32"]["median"] for r in results.values())
    write_section("int8_architectures", "python -m benchmarks.int8_architectures",
                  f"Untrained models on 1x28x28 inputs; bare-loop training images/s (batch 128); batch-64 p50 latency, "
                  f"median of {rounds} interleaved rounds of {repeats} calls; {machine()}",
                  ("architecture", "params", "train img/s (vs stock)", "torch eager ms", "ORT fp32 ms", "ORT int8 ms",
                   "int8 vs ORT fp32", "int8 vs torch eager"), rows,
                  f"int8 gains on ORT fp32 only where convs are wide, which costs training speed; no candidate comes "
                  f"near 10x torch eager (best {best_eager:.2f}x), since torch eager runs the wider convs efficiently "
                  "too.")


if __name__ == "__main__":
    typer.run(main)
