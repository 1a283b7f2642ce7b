"""Stage `compress`: ONNX export, int8 static quantization, and accuracy / size / latency side by side."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kiln.config import CompressParams, Params
from kiln.data import load_split, stratified_head, to_float
from kiln.io import atomic_path, write_json
from kiln.models import load_trained_model
from kiln.onnx_tools import export_onnx, measure_latency, onnx_runner, predict_batches, quantize_int8

CALIBRATION_SEED = 0
ENGINES = ("torch_fp32", "ort_fp32", "ort_int8")


def torch_runner(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Eager torch inference on one float32 batch, with torch's default threads."""

    @torch.inference_mode()
    def run(images: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(images)).numpy()

    return run


def compress(
    params: CompressParams,
    model_path: Path = Path("models/model.pt"),
    prepared_dir: Path = Path("data/prepared"),
    models_dir: Path = Path("models"),
    report_dir: Path = Path("reports/compress"),
) -> dict[str, float]:
    """Export model_fp32.onnx, quantize model_int8.onnx, measure all three engines on val; returns the metrics.

    Outputs are written only if every step succeeds, so a failed run leaves the previous ones untouched.
    """
    model, _ = load_trained_model(str(model_path))
    x_train, y_train = load_split(prepared_dir, "train")
    x_val, y_val = load_split(prepared_dir, "val")
    calibration = to_float(x_train[stratified_head(y_train, params.calibration_samples, CALIBRATION_SEED)])
    images = to_float(x_val)
    big_batch = np.resize(images, (params.latency_batch_size, *images.shape[1:]))  # repeats val if it is smaller

    fp32_target, int8_target = models_dir / "model_fp32.onnx", models_dir / "model_int8.onnx"
    with atomic_path(fp32_target) as fp32_path, atomic_path(int8_target) as int8_path:
        export_onnx(model, torch.from_numpy(images[:2]), fp32_path)
        print(f"compress: exported {fp32_target} ({fp32_path.stat().st_size:,} bytes)")
        quantize_int8(fp32_path, int8_path, calibration)
        print(f"compress: quantized {int8_target} ({int8_path.stat().st_size:,} bytes) on {len(calibration)} images")
        runners = dict(zip(ENGINES, (torch_runner(model), onnx_runner(fp32_path), onnx_runner(int8_path)), strict=True))
        metrics: dict[str, float] = {
            "model_pt_bytes": model_path.stat().st_size,
            "fp32_onnx_bytes": fp32_path.stat().st_size,
            "int8_onnx_bytes": int8_path.stat().st_size,
            "latency_batch_size": params.latency_batch_size,
        }
        for engine, run in runners.items():
            metrics[f"{engine}_val_accuracy"] = float((predict_batches(run, images).argmax(1) == y_val).mean())
            for label, batch in (("batch1", images[:1]), ("batched", big_batch)):
                timing = measure_latency(run, batch, params.latency_repeats)
                metrics.update({f"{engine}_{label}_{key}": value for key, value in timing.items()})
        int8_ms = metrics["ort_int8_batched_p50_ms"]
        metrics.update(
            int8_size_ratio=metrics["fp32_onnx_bytes"] / metrics["int8_onnx_bytes"],
            int8_speedup_vs_ort_fp32=metrics["ort_fp32_batched_p50_ms"] / int8_ms,
            int8_speedup_vs_torch_eager=metrics["torch_fp32_batched_p50_ms"] / int8_ms,
            int8_accuracy_drop_points=(metrics["ort_fp32_val_accuracy"] - metrics["ort_int8_val_accuracy"]) * 100,
        )
        write_json(report_dir / "metrics.json", metrics)  # the onnx files move into place right after

    print(
        f"compress: int8 val accuracy {metrics['ort_int8_val_accuracy']:.4f} (ORT fp32 "
        f"{metrics['ort_fp32_val_accuracy']:.4f}, drop {metrics['int8_accuracy_drop_points']:.2f} points), "
        f"{metrics['int8_size_ratio']:.2f}x smaller"
    )
    size = params.latency_batch_size
    print(f"{'engine':<12}{'val acc':>9}{'b1 p50 ms':>11}{f'b{size} p50 ms':>13}{f'b{size} img/s':>13}")
    for engine in ENGINES:
        print(
            f"{engine:<12}{metrics[f'{engine}_val_accuracy']:>9.4f}{metrics[f'{engine}_batch1_p50_ms']:>11.3f}"
            f"{metrics[f'{engine}_batched_p50_ms']:>13.3f}{metrics[f'{engine}_batched_images_per_s']:>13,.0f}"
        )
    return metrics


def run(params: Params) -> dict[str, float]:
    """The stage as `python -m tasks compress` runs it."""
    return compress(params.compress)

