"""ONNX export, int8 static quantization, ONNX Runtime inference and latency measurement.

ONNX Runtime sessions keep ORT's default thread count (intra-op threads = physical cores), as torch does.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

INPUT, OUTPUT = "pixels", "logits"


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    """Export `model` (switched to eval mode) with the dynamo exporter: one self-contained file, dynamic batch."""
    program = torch.onnx.export(
        model.eval(),
        (sample,),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto  # a property that serialises afresh on every access
    graph = proto.graph
    for item in (*graph.node, *graph.initializer, *graph.value_info, *graph.input, *graph.output):
        del item.metadata_props[:]  # exporter debug info: stack traces naming this checkout's absolute paths
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


class _Batches(CalibrationDataReader):
    """Feeds calibration images to the quantizer a few at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter(np.split(images, range(batch_size, len(images), batch_size)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantization calibrated on `calibration` (float32 NCHW in [0, 1]).

    Per-channel int8 weights, uint8 activations, 7-bit weight range: ORT's advice for x86 CPUs, where
    reduce_range avoids int16 saturation in the AVX2 (non-VNNI) kernels at little accuracy cost.
    """
    if len(calibration) == 0:
        raise ValueError("quantize_int8 needs at least one calibration image")
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        prepared = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_path),
            _Batches(calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    onnx.checker.check_model(str(int8_path), full_check=True)


def onnx_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """A function mapping one float32 batch to logits through an ORT CPU session opened once."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([OUTPUT], {INPUT: images})[0]


def predict_batches(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """`run` over `images` in batches, outputs concatenated."""
    return np.concatenate([run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)])


def predict_onnx(path: Path, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model at `path` for float32 NCHW images in [0, 1]."""
    return predict_batches(onnx_runner(path), np.ascontiguousarray(images, dtype=np.float32), batch_size)


def measure_latency(run: Callable[[np.ndarray], object], batch: np.ndarray, repeats: int, warmup: int = 5) -> dict:
    """Time `run(batch)` `repeats` times after `warmup` calls: p50/p95 in ms and images/s at the median."""
    for _ in range(warmup):
        run(batch)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        seconds.append(time.perf_counter() - start)
    p50, p95 = np.percentile(seconds, [50, 95])
    return {"p50_ms": float(p50 * 1e3), "p95_ms": float(p95 * 1e3), "images_per_s": float(len(batch) / p50)}
