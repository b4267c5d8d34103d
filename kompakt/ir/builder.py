"""Small helpers for building IR graphs by hand (tests, passes that emit new nodes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
import torch

from kompakt.ir.tensors import from_torch

DEFAULT_OPSET = 21
"""The opset kompakt works at: the first with blocked (int4) DequantizeLinear, and one that
ONNX Runtime 1.31 runs in full (opset 23's RotaryEmbedding breaks there for batch > 1)."""

IR_VERSION = 10
"""ONNX IR version written on export: opset 21 needs IR >= 10; ORT 1.31 rejects IR > 13, and
onnx 1.23 would otherwise write 14."""


def constant(
    graph: ir.Graph, data: torch.Tensor | np.ndarray, name: str, dtype: ir.DataType | None = None
) -> ir.Value:
    """Registers ``data`` as an initializer of ``graph`` under a unique name and returns it."""
    tensor = from_torch(torch.as_tensor(data), name=None, dtype=dtype)
    value = ir.Value(name=unique_name(graph, name), const_value=tensor)
    value.type = ir.TensorType(tensor.dtype)
    value.shape = ir.Shape(tensor.shape)
    tensor.name = value.name
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base`` if no value of the graph is called so, else ``base_1``, ``base_2``, ..."""
    taken = _names(graph)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        names.update(v.name for v in node.outputs if v.name)
    return names


def make_model(
    inputs: Sequence[ir.Value],
    outputs: Sequence[ir.Value],
    nodes: Sequence[ir.Node],
    initializers: Sequence[ir.Value] = (),
    opset: int = DEFAULT_OPSET,
) -> ir.Model:
    """A model around the given nodes, at kompakt's opset and IR version."""
    graph = ir.Graph(
        inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": opset}
    )
    return ir.Model(graph, ir_version=IR_VERSION, producer_name="kompakt")


def first_in_graph(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The one of ``nodes`` that comes first in ``graph``'s order (where to insert before)."""
    wanted = {id(n) for n in nodes}
    return next(n for n in graph if id(n) in wanted)
