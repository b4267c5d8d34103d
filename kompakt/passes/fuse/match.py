"""Small graph questions every fusion pattern asks: is this node that op, is that value a
constant, who reads it, what is the Add's other operand."""

from __future__ import annotations

import onnx_ir as ir

from kompakt.ir.tensors import to_torch


def is_op(node: ir.Node | None, op: str) -> bool:
    """``node`` is the standard ONNX op ``op``."""
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's constant tensor: an initializer's, or a ``Constant`` node's ``value``."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if is_op(producer, "Constant") and not producer.inputs:
        attr = producer.attributes.get("value")
        return attr.as_tensor() if attr is not None else None
    return None


def const_scalar(value: ir.Value | None) -> float | None:
    """A constant of exactly one element, as a float."""
    tensor = const_tensor(value)
    if tensor is None or tensor.size != 1:
        return None
    return float(to_torch(tensor).reshape(()).item())


def single_consumer(value: ir.Value, graph: ir.Graph) -> ir.Node | None:
    """The one node reading ``value``, if exactly one does and it is not a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value in graph.outputs:
        return None
    return uses[0].node


def other_input(node: ir.Node | None, value: ir.Value) -> ir.Value | None:
    """The second operand of a two-input node one of whose inputs is ``value`` (not both)."""
    if node is None or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def same_shape(a: ir.Value, b: ir.Value) -> bool:
    """Both shapes known and equal dim for dim (symbolic dims by name)."""
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def const_ints(value: ir.Value | None) -> list[int] | None:
    """The value's constant int32/int64 tensor flattened to a list, or None."""
    tensor = const_tensor(value)
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return [int(v) for v in to_torch(tensor).reshape(-1)]


def attr_ints(node: ir.Node | None, name: str) -> list[int] | None:
    """The node's ints attribute ``name`` as a list, or None (no node, no attribute)."""
    attr = node.attributes.get(name) if node is not None else None
    return None if attr is None else [int(i) for i in attr.as_ints()]


def same_dim(a: object, b: object) -> bool:
    """Provably equal dims: equal ints, or symbolic dims of one (known) name."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and a.value is not None and a == b


class Roles(dict):
    """``id(value) -> role`` for a fused group's outside inputs; a value with several roles
    (one constant as a weight and a bias, k and v the same tensor) gets them ``+``-joined, which
    is how binders read them back (`kompakt.codegen.binding.input_roles`)."""

    def add(self, value: ir.Value | None, name: str) -> None:
        if value is not None:
            self._add(id(value), name)

    def merge(self, other: Roles, rename: dict[str, str] | None = None) -> None:
        """Adds another group's roles, renamed by ``rename`` (e.g. ``{"x": "x2"}``)."""
        for key, roles in other.items():
            for name in roles.split("+"):
                self._add(key, (rename or {}).get(name, name))

    def _add(self, key: int, name: str) -> None:
        old = self.get(key)
        if old is None:
            self[key] = name
        elif name not in old.split("+"):
            self[key] = f"{old}+{name}"

    def has(self, name: str) -> bool:
        return any(name in roles.split("+") for roles in self.values())

    def attribute(self, node: ir.Node) -> ir.Attr:
        """The fused node's ``roles`` attribute: one entry per input, ``other`` if unnamed."""
        return ir.AttrStrings("roles", [self.get(id(v), "other") for v in node.inputs])
