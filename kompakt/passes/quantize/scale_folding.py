"""Dividing an activation by per-channel scales without adding an op, where the graph allows.

AWQ and SmoothQuant rescale a MatMul's input channels: x -> x / s. Where the op producing x is
linear per channel in its last axis, the division folds into that op's constants:

- LayerNormalization (over the last axis): its scale and bias;
- Mul by a constant over the last axis (the weight of an RMSNorm): that constant;
- MatMul with a float constant weight [M, K] (optionally + a constant bias): its output columns;
- Mul of two activations, one of which such a MatMul produces (SwiGLU's gate * up): that MatMul.

Otherwise an explicit ``Mul(x, 1/s)`` goes in front of the consumers. Folding is allowed only when
x feeds nothing but the consumers being rescaled, and only into ops the caller allows (the
current calibration block: earlier blocks' outputs have already been computed).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir
import torch

from kompakt.ir.builder import constant, first_in_graph
from kompakt.ir.metadata import copy_module
from kompakt.ir.tensors import from_torch, to_torch, torch_dtype


def divide_input(
    graph: ir.Graph,
    x: ir.Value,
    scale: torch.Tensor,
    consumers: list[ir.Node],
    allowed: Collection[int],
) -> str:
    """Makes ``consumers`` see x / scale. Returns how: ``folded into <op>`` or ``explicit Mul``."""
    inverse = 1.0 / scale
    if {id(u.node) for u in x.uses()} <= {id(c) for c in consumers} and not x.is_graph_output():
        folded = _fold(graph, x.producer(), inverse, allowed)
        if folded:
            return f"folded into {folded}"
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    factor = constant(graph, inverse.to(torch_dtype(dtype)), f"{x.name}_inverse_scale")
    mul = ir.node("Mul", [x, factor], name=f"{x.name}/input_scale")
    copy_module(consumers[0], mul)
    mul.outputs[0].name = f"{x.name}_scaled"
    mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
    graph.insert_before(first_in_graph(graph, consumers), mul)
    for node in consumers:
        for index, value in enumerate(node.inputs):
            if value is x:
                node.replace_input_with(index, mul.outputs[0])
    return "explicit Mul"


def _fold(graph: ir.Graph, producer: ir.Node | None, inverse: torch.Tensor, allowed) -> str | None:
    if producer is None or id(producer) not in allowed:
        return None
    k = inverse.shape[0]
    if producer.op_type == "LayerNormalization":
        axis = producer.attributes.get("axis")
        if axis is not None and axis.value not in (-1, len(producer.inputs[0].shape or [0]) - 1):
            return None
        if not all(v is None or _is_channel_constant(v, k) for v in producer.inputs[1:3]):
            return None
        for index in (1, 2):
            if index < len(producer.inputs) and producer.inputs[index] is not None:
                _scale_constant(graph, producer, index, lambda t: t * inverse.to(t.dtype))
        return "LayerNormalization"
    if producer.op_type == "Mul":
        for index in (0, 1):
            if _is_channel_constant(producer.inputs[index], k):
                _scale_constant(
                    graph, producer, index, lambda t: t * inverse.to(t.dtype).reshape(t.shape)
                )
                return "Mul"
        for operand in producer.inputs:
            inner = operand.producer() if operand is not None else None
            if (
                operand is not None
                and len(operand.uses()) == 1
                and _fold_linear(graph, inner, inverse, allowed)
            ):
                return f"{inner.op_type} (through Mul)"
        return None
    return producer.op_type if _fold_linear(graph, producer, inverse, allowed) else None


def _fold_linear(graph: ir.Graph, node: ir.Node | None, inverse: torch.Tensor, allowed) -> bool:
    """MatMul(x, W) or Add(MatMul(x, W), b) with float constants: scale W's columns (and b)."""
    if node is None or id(node) not in allowed:
        return False
    k = inverse.shape[0]
    if node.op_type == "Add":
        for index in (0, 1):
            bias, other = node.inputs[index], node.inputs[1 - index]
            matmul = other.producer() if other is not None else None
            if (
                _is_channel_constant(bias, k)
                and matmul is not None
                and len(other.uses()) == 1
                and _fold_linear(graph, matmul, inverse, allowed)
            ):
                _scale_constant(
                    graph, node, index, lambda t: t * inverse.to(t.dtype).reshape(t.shape)
                )
                return True
        return False
    if node.op_type != "MatMul":
        return False
    weight = node.inputs[1]
    if (
        weight is None
        or weight.const_value is None
        or len(weight.const_value.shape) != 2
        or weight.const_value.shape[1] != k
        or not to_torch(weight.const_value).is_floating_point()
    ):
        return False
    _scale_constant(graph, node, 1, lambda t: t * inverse.to(t.dtype)[None, :])
    return True


def _is_channel_constant(value: ir.Value | None, k: int) -> bool:
    """A float constant over the last axis only: shape [K] or [1, ..., 1, K]."""
    if value is None or value.const_value is None:
        return False
    shape = list(value.const_value.shape)
    return (
        bool(shape)
        and shape[-1] == k
        and all(d == 1 for d in shape[:-1])
        and to_torch(value.const_value).is_floating_point()
    )


def _scale_constant(graph: ir.Graph, node: ir.Node, index: int, transform) -> None:
    """Replaces input ``index`` of ``node`` (a constant) by ``transform(constant)``; a constant
    that other nodes also use is copied, not changed under them."""
    value = node.inputs[index]
    data = transform(to_torch(value.const_value))
    if len(value.uses()) == 1 and value.is_initializer():
        value.const_value = from_torch(data.contiguous(), name=value.name)
        return
    node.replace_input_with(index, constant(graph, data.contiguous(), f"{value.name}_rescaled"))
