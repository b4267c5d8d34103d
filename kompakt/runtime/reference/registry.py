"""The reference runtime's op table: ONNX op -> torch implementation.

The reference runtime is the semantic definition of every op kompakt runs: passes, fusions and
kernels are checked against it. Each op is registered as a *builder*: it reads the node's
attributes once, when the plan is built, and returns a kernel closure that only does tensor math.

    @op("Softmax")
    def softmax(node: NodeInfo) -> Kernel:
        axis = node.attr("axis", -1)
        return lambda x: torch.softmax(x, axis)

A kernel takes the node's inputs as torch tensors (None for an omitted optional input) and
returns a tensor, or a tuple/list with one entry per node output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir
import torch

from kompakt.errors import UnsupportedOpError
from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import to_torch, torch_dtype

Kernel = Callable[..., Any]
OpBuilder = Callable[["NodeInfo"], Kernel]

_MISSING = object()
_OPS: dict[tuple[str, str], OpBuilder] = {}


def op(*op_types: str, domain: str = "") -> Callable[[OpBuilder], OpBuilder]:
    """Registers a builder for one or more op types of ``domain``."""

    def register(builder: OpBuilder) -> OpBuilder:
        for op_type in op_types:
            key = (domain, op_type)
            if key in _OPS:
                raise ValueError(f"op {key} registered twice")
            _OPS[key] = builder
        return builder

    return register


def supported_ops() -> frozenset[tuple[str, str]]:
    """(domain, op_type) pairs the reference runtime can execute."""
    _load_op_modules()
    return frozenset(_OPS)


@dataclass(frozen=True)
class NodeInfo:
    """What an op builder may know about the node it builds a kernel for."""

    node: ir.Node
    opset: int

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def num_inputs(self) -> int:
        return len(self.node.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.node.outputs)

    def attr(self, name: str, default: Any = _MISSING) -> Any:
        """The attribute as a Python value (tensors as torch tensors, strings decoded)."""
        attr = self.node.attributes.get(name)
        if attr is None:
            if default is _MISSING:
                raise self.unsupported(f"required attribute '{name}' is missing")
            return default
        if attr.is_ref():
            raise self.unsupported(f"attribute '{name}' refers to a function attribute")
        kind = attr.type
        if kind == ir.AttributeType.TENSOR:
            return to_torch(attr.as_tensor())
        if kind == ir.AttributeType.STRING:
            value = attr.as_string()
            return value.decode() if isinstance(value, bytes) else value
        if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            return list(attr.value)
        if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            raise self.unsupported(f"attribute '{name}' is a subgraph (control flow)")
        return attr.value

    def output_dtype(self, index: int = 0) -> torch.dtype | None:
        """The torch dtype the IR declares for output ``index``, when it declares one."""
        value = self.node.outputs[index]
        return torch_dtype(value.dtype) if value.dtype is not None else None

    def input_dtype(self, index: int) -> ir.DataType | None:
        value = self.node.inputs[index] if index < len(self.node.inputs) else None
        return value.dtype if value is not None else None

    def unsupported(self, detail: str) -> UnsupportedOpError:
        """An error naming this node, for builders to raise."""
        return UnsupportedOpError(
            _qualified(self.node), self.node.name or "?", module_of(self.node), detail
        )


def _qualified(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain else node.op_type


def build_kernel(node: ir.Node, opset: int) -> Kernel:
    """The kernel for ``node``; raises `UnsupportedOpError` naming the op and node."""
    _load_op_modules()
    domain = "" if node.domain == "ai.onnx" else node.domain
    builder = _OPS.get((domain, node.op_type))
    if builder is None:
        raise UnsupportedOpError(
            _qualified(node),
            node.name or "?",
            module_of(node),
            "the reference runtime has no kernel for it",
        )
    return builder(NodeInfo(node, opset))


_loaded = False


def _load_op_modules() -> None:
    """Imports the modules that fill the table (kept lazy so importing kompakt stays cheap)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from kompakt.runtime.reference import (  # noqa: F401
        ops_elementwise,
        ops_fused,
        ops_nn,
        ops_quant,
        ops_reduce,
        ops_shape,
    )
