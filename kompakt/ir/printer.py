"""A stable, compact text form of the IR, for dumps, golden tests and error messages.

One line per node, in graph order:
``%y: f32[batch,sequence,32] = MatMul(%x, %layers.0.q_proj.weight)  # model.layers.0.q_proj``
Names come from the IR, so the text is deterministic for a deterministic IR.
"""

from __future__ import annotations

import onnx_ir as ir

from kompakt.ir.metadata import module_of

_SHORT = {
    "FLOAT": "f32",
    "FLOAT16": "f16",
    "BFLOAT16": "bf16",
    "DOUBLE": "f64",
    "INT64": "i64",
    "INT32": "i32",
    "INT8": "i8",
    "UINT8": "u8",
    "INT4": "i4",
    "UINT4": "u4",
    "BOOL": "bool",
}


def format_type(value: ir.Value) -> str:
    """``f32[batch,32]`` for a value, ``?`` parts where the IR does not know."""
    dtype = _SHORT.get(value.dtype.name, value.dtype.name.lower()) if value.dtype else "?"
    if value.shape is None:
        return f"{dtype}[?]"
    dims = ",".join(str(d) if d is not None and str(d) != "None" else "?" for d in value.shape)
    return f"{dtype}[{dims}]"


def _ref(value: ir.Value | None) -> str:
    return "%" + value.name if value is not None and value.name else "_"


def format_attr(attr: ir.Attr) -> str:
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        return f"{attr.name}=<graph>"
    if attr.type == ir.AttributeType.TENSOR:
        tensor = attr.as_tensor()
        return f"{attr.name}=<tensor {tensor.dtype.name} {list(tensor.shape)}>"
    return f"{attr.name}={attr.value!r}"


def format_node(node: ir.Node) -> str:
    outs = ", ".join(f"{_ref(v)}: {format_type(v)}" for v in node.outputs)
    op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
    attrs = ", ".join(format_attr(a) for a in node.attributes.values())
    attrs = f"<{attrs}>" if attrs else ""
    args = ", ".join(_ref(v) for v in node.inputs)
    module = module_of(node)
    comment = f"  # {module}" if module else ""
    return f"{outs} = {op}{attrs}({args}){comment}"


def format_graph(graph: ir.Graph) -> str:
    """The whole graph as text: inputs, initializers (type only), nodes, outputs."""
    lines = [f"graph {graph.name or 'main'}("]
    lines += [f"  input %{v.name}: {format_type(v)}" for v in graph.inputs]
    lines += [
        f"  init  %{name}: {format_type(v)}" for name, v in sorted(graph.initializers.items())
    ]
    lines.append(") {")
    lines += ["  " + format_node(node) for node in graph]
    lines.append("  return " + ", ".join(_ref(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
