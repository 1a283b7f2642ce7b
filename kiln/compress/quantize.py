"""int8 static quantization of an exported model for ONNX Runtime (kiln.core.export writes the fp32 file)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

from kiln.core.inference import INPUT

# ORT's fast int8 conv kernel (MLAS's symmetric conv) takes input channels in multiples of 4 and at least 16 output
# channels, a multiple of 8 (AVX2; 4 on AVX-512)
CHANNEL_MULTIPLE, MIN_OUTPUT_CHANNELS, OUTPUT_CHANNEL_MULTIPLE = 4, 16, 8


def _pad_conv_channels(model: onnx.ModelProto) -> None:
    """Give 2-d convs on images (group 1, fewer than CHANNEL_MULTIPLE input channels) zero input channels and zero
    weights to match (the same function), so that their int8 form runs on ORT's symmetric int8 conv kernel rather
    than im2col and a GEMM (1.4x slower for a 1-to-32-channel 3x3 conv on 28x28 images). Deeper convs are left alone:
    their Pad would run in float between a dequantize and a quantize."""
    graph = model.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    for node in list(graph.node):
        group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        if node.op_type != "Conv" or group != 1 or node.input[1] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]])
        outputs, inputs = weight.shape[:2]
        if (weight.ndim != 4 or inputs >= CHANNEL_MULTIPLE or outputs < MIN_OUTPUT_CHANNELS
                or outputs % OUTPUT_CHANNEL_MULTIPLE):
            continue
        extra = CHANNEL_MULTIPLE - inputs
        constants[node.input[1]].CopyFrom(numpy_helper.from_array(np.pad(weight, ((0, 0), (0, extra), (0, 0), (0, 0))),
                                                                  node.input[1]))
        pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64), f"{node.name}_pads")
        graph.initializer.append(pads)
        pad = helper.make_node("Pad", [node.input[0], pads.name], [f"{node.input[0]}_channel_padded"],
                               name=f"{node.name}_channel_pad")
        graph.node.insert(list(graph.node).index(node), pad)
        node.input[0] = pad.output[0]


class _Batches(CalibrationDataReader):
    """Feeds calibration images to the quantizer a few at a time."""

    def __init__(self, images: np.ndarray, batch_size: int = 32) -> None:
        self._batches = iter(np.split(images, range(batch_size, len(images), batch_size)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static QDQ quantization, min-max calibrated on `calibration` (float32 NCHW in [0, 1]).

    uint8 activations and symmetric per-channel int8 weights (uint8 or asymmetric weights run on ORT's slower
    kernels), 7-bit weight range: it avoids int16 saturation in the AVX2 (non-VNNI) kernels and costs neither accuracy
    nor speed on VNNI CPUs. ORT fuses every DequantizeLinear -> Conv -> QuantizeLinear into an NHWC QLinearConv;
    ONNX Runtime's pre-processing (shape inference, constant folding) runs first and narrow conv inputs get zero
    channels (`_pad_conv_channels`).
    """
    if len(calibration) == 0:
        raise ValueError("quantize_int8 needs at least one calibration image")
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        prepared = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        model = onnx.load(str(prepared))
        _pad_conv_channels(model)
        quantize_static(
            model,
            str(int8_path),
            _Batches(calibration.astype(np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    onnx.checker.check_model(str(int8_path), full_check=True)
