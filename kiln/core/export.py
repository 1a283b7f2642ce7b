"""ONNX export of a kiln model: one self-contained file with a dynamic batch, what compress, evaluate, finetune and
`kiln predict` run through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from kiln.core.inference import INPUT, output_names
from kiln.core.models import TaskOutputs, task_heads


def export_onnx(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    """Export `model` (switched to eval mode) with the dynamo exporter: one self-contained file, dynamic batch; a
    multi-task model gets one output per task, `logits_<task>` (kiln.core.inference.output_names)."""
    tasks = task_heads(model)
    program = torch.onnx.export(
        TaskOutputs(model).eval() if tasks else model.eval(),
        (sample,),
        dynamo=True,
        input_names=[INPUT],
        output_names=output_names(list(tasks)),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    proto = program.model_proto  # a property that serialises afresh on every access
    graph = proto.graph
    for item in (*graph.node, *graph.initializer, *graph.value_info, *graph.input, *graph.output):
        del item.metadata_props[:]  # exporter debug info: stack traces naming this checkout's absolute paths
    _global_average_pools(graph)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def _global_average_pools(graph: onnx.GraphProto) -> None:
    """Turn ReduceMean over H and W of a 4-d tensor (keepdims), the exporter's AdaptiveAvgPool2d(1), into
    GlobalAveragePool, which ORT keeps in its blocked float layout and fuses into QLinearGlobalAveragePool in int8
    graphs (a ReduceMean stays float there, between a transpose and a dequantize)."""
    constants = {tensor.name: tensor for tensor in graph.initializer}
    ranks = {info.name: len(info.type.tensor_type.shape.dim) for info in graph.value_info}
    for node in graph.node:
        if node.op_type != "ReduceMean" or len(node.input) != 2 or node.input[1] not in constants:
            continue
        rank = ranks.get(node.input[0])
        keepdims = next((attribute.i for attribute in node.attribute if attribute.name == "keepdims"), 1)
        axes = {int(axis) % rank for axis in numpy_helper.to_array(constants[node.input[1]])} if rank else set()
        if rank == 4 and keepdims and axes == {2, 3}:
            node.CopyFrom(helper.make_node("GlobalAveragePool", [node.input[0]], node.output, name=node.name))
    used = {name for node in graph.node for name in node.input}
    for name in set(constants) - used:
        graph.initializer.remove(constants[name])


