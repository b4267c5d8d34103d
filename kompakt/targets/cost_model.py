"""Roofline cost model: predicted time of each node on a target device.

    time(node) = max(flops / peak[compute type], bytes / memory bandwidth) + launch overhead

Bytes are every input read plus every output written. A fused group (``kompakt::FusedKernel``)
is one kernel: it is charged its inputs and outputs, and its body's flops. A DequantizeLinear of a constant weight
that only feeds MatMuls is counted as part of those MatMuls (ONNX Runtime fuses the pair into
MatMulNBits; kompakt's GPU kernels dequantize in registers), so a quantized layer is charged its
packed weight bytes. Ops that only reinterpret a buffer (Reshape, Squeeze, ...) cost nothing.

The model needs concrete shapes: the caller passes the shapes observed on a real run (see
`kompakt.runtime.profile`), falling back to static shapes the IR knows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

from kompakt.ir.fused import body_of, is_fused, pattern_of
from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import storage_bytes
from kompakt.targets.hardware import HardwareSpec

VIEW_OPS = frozenset(
    {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Shape", "Size", "Constant"}
)
MATMUL_OPS = frozenset({"MatMul", "Gemm", "MatMulNBits", "MatMulInteger"})
# Approximate flops per output element of multi-step ops (exp, sums, divides).
_FLOPS_PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 6, "LayerNormalization": 8, "Gelu": 8, "Erf": 8}

_COMPUTE = {
    ir.DataType.FLOAT: "fp32",
    ir.DataType.FLOAT16: "fp16",
    ir.DataType.BFLOAT16: "bf16",
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "int8",
    ir.DataType.FLOAT8E4M3FN: "fp8",
}

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class NodeCost:
    """Predicted cost of one node."""

    node: str
    op: str
    module: str
    flops: float
    bytes: float
    seconds: float
    bound: str  # "memory", "compute", "overhead" or "free"


class CostModel:
    """Predicts per-node time of an IR model on ``device``."""

    def __init__(self, device: HardwareSpec) -> None:
        self.device = device

    def estimate(self, model: ir.Model, shapes: Shapes | None = None) -> list[NodeCost]:
        """One `NodeCost` per node, in graph order."""
        shapes = shapes or {}
        fused = _fused_dequantize(model.graph)
        return [self._node_cost(node, shapes, fused) for node in model.graph]

    def total_seconds(self, costs: list[NodeCost]) -> float:
        return sum(c.seconds for c in costs)

    def _node_cost(self, node: ir.Node, shapes: Shapes, fused: set[int]) -> NodeCost:
        label = dict(node=node.name or "?", op=node.op_type, module=module_of(node))
        if node.op_type in VIEW_OPS or id(node) in fused:
            return NodeCost(**label, flops=0.0, bytes=0.0, seconds=0.0, bound="free")
        read = sum(self._bytes_read(v, shapes, fused) for v in node.inputs if v is not None)
        written = sum(_value_bytes(v, shapes) for v in node.outputs if v.name)
        if is_fused(node):
            # One kernel: it reads the group's inputs and writes its outputs once; what flows
            # between the group's nodes stays in registers. Its work is the body's.
            label["op"] = f"FusedKernel[{pattern_of(node)}]"
            flops, compute = self._body_flops(node, shapes)
        else:
            flops, compute = self._flops(node, shapes)
        compute_time = flops / self.device.peak(compute)
        memory_time = (read + written) / self.device.memory_bandwidth
        overhead = self.device.launch_overhead
        core = max(compute_time, memory_time)
        bound = (
            "overhead"
            if overhead > core
            else ("compute" if compute_time > memory_time else "memory")
        )
        return NodeCost(
            **label, flops=flops, bytes=read + written, seconds=core + overhead, bound=bound
        )

    def _bytes_read(self, value: ir.Value, shapes: Shapes, fused: set[int]) -> float:
        producer = value.producer()
        if producer is not None and id(producer) in fused:
            # The packed weight, its scales and zero points are what the fused kernel reads.
            return sum(_value_bytes(v, shapes) for v in producer.inputs if v is not None)
        return _value_bytes(value, shapes)

    def _body_flops(self, node: ir.Node, shapes: Shapes) -> tuple[float, str]:
        """Flops of a fused node's body, its values shaped like the node's inputs and outputs.

        Inner values the run never saw are taken to be the size of the node's first output
        (true of epilogues and elementwise chains; an attention body's scores are larger).
        """
        body = body_of(node)
        inner: dict[str, tuple[int, ...]] = {}
        for outer, value in zip(node.inputs, body.inputs, strict=False):
            if outer is not None and (shape := _shape(outer, shapes)) is not None:
                inner[value.name] = shape
        for outer, value in zip(node.outputs, body.outputs, strict=False):
            if (shape := _shape(outer, shapes)) is not None:
                inner[value.name] = shape
        default = _shape(node.outputs[0], shapes)
        for body_node in body:
            for value in body_node.outputs:
                if value.name not in inner and _shape(value, {}) is None and default:
                    inner[value.name] = default
        total, compute = 0.0, "fp32"
        for body_node in body:
            flops, kind = self._flops(body_node, inner)
            total += flops
            if body_node.op_type in MATMUL_OPS:
                compute = kind
        return total, compute

    def _flops(self, node: ir.Node, shapes: Shapes) -> tuple[float, str]:
        out = node.outputs[0] if node.outputs else None
        out_elems = _numel(out, shapes) if out is not None else 0
        if node.op_type in MATMUL_OPS and node.inputs and node.inputs[0] is not None:
            a = _shape(node.inputs[0], shapes)
            k = a[-1] if a else 0
            compute = _COMPUTE.get(node.inputs[0].dtype, "fp32")
            if node.op_type == "MatMulInteger":
                compute = "int8"
            return 2.0 * out_elems * k, compute
        return float(out_elems * _FLOPS_PER_ELEMENT.get(node.op_type, 1)), "fp32"


def _fused_dequantize(graph: ir.Graph) -> set[int]:
    """DequantizeLinear nodes of constants whose every consumer is a MatMul weight input."""
    fused = set()
    for node in graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        if node.inputs[0].const_value is None:
            continue
        uses = node.outputs[0].uses()
        if uses and all(u.node.op_type in MATMUL_OPS and u.idx == 1 for u in uses):
            fused.add(id(node))
    return fused


def _shape(value: ir.Value, shapes: Shapes) -> tuple[int, ...] | None:
    if value.name in shapes:
        return tuple(shapes[value.name])
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if value.shape is not None and value.shape.is_static():
        return tuple(int(d) for d in value.shape)
    return None


def _numel(value: ir.Value, shapes: Shapes) -> int:
    shape = _shape(value, shapes)
    return math.prod(shape) if shape is not None else 0


def _value_bytes(value: ir.Value, shapes: Shapes) -> float:
    dtype = value.dtype or _producer_dtype(value)
    return storage_bytes(dtype, _numel(value, shapes)) if dtype is not None else 0.0


def _producer_dtype(value: ir.Value) -> ir.DataType | None:
    """An output without a declared type: most ops return their first input's type."""
    producer = value.producer()
    if producer is None or not producer.inputs or producer.inputs[0] is None:
        return None
    if is_fused(producer):  # the type of what the body computes there
        inner = body_of(producer).outputs[value.index()]
        return inner.dtype or _producer_dtype(inner)
    return producer.inputs[0].dtype
