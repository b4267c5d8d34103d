"""Structural checks of an IR graph, run between passes in debug/test mode and before export.

These catch what a buggy pass leaves behind: a value used before it is produced, a name used
twice, an output nobody produces, an op no schema knows.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir import fused

# Domains whose ops the verifier accepts without an ONNX schema of its own.
# com.microsoft: ONNX Runtime contrib ops (e.g. MatMulNBits); their schemas live in ORT.
CONTRIB_DOMAINS = frozenset({"com.microsoft"})


class VerificationError(KompaktError):
    """The IR is malformed; the message lists every problem found (up to a limit)."""


def verify(model: ir.Model, max_problems: int = 20) -> None:
    """Raises `VerificationError` listing what is wrong with ``model``'s main graph."""
    problems = list(_problems(model))
    if problems:
        shown = problems[:max_problems]
        more = (
            f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        )
        raise VerificationError("invalid IR:\n  " + "\n  ".join(shown) + more)


def _problems(model: ir.Model):
    graph = model.graph
    opset = model.opset_imports.get("", None)
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(value: ir.Value, where: str):
        defined.add(id(value))
        if not value.name:
            return f"{where} produces a value without a name"
        if value.name in names:
            return f"value name '{value.name}' is defined twice ({names[value.name]} and {where})"
        names[value.name] = where
        return None

    for value in graph.inputs:
        if (p := define(value, f"graph input '{value.name}'")) is not None:
            yield p
    for name, value in graph.initializers.items():
        if value.const_value is None:
            yield f"initializer '{name}' has no data"
        if id(value) in defined:
            continue  # an initializer that is also a graph input
        if (p := define(value, f"initializer '{name}'")) is not None:
            yield p
    for node in graph:
        label = f"node '{node.name}' ({node.op_type})"
        for i, value in enumerate(node.inputs):
            if value is not None and id(value) not in defined:
                yield f"{label} input {i} '{value.name}' is used before it is produced"
        for value in node.outputs:
            if (p := define(value, label)) is not None:
                yield p
        if (p := _unknown_op(node, opset, model.opset_imports)) is not None:
            yield f"{label}: {p}"
    for value in graph.outputs:
        if id(value) not in defined:
            yield f"graph output '{value.name}' is not produced by any node, input or initializer"


def _unknown_op(node: ir.Node, opset: int | None, imports: dict[str, int]) -> str | None:
    domain = node.domain or ""
    if domain not in imports and domain != "":
        return f"domain '{domain}' is not in the model's opset imports"
    if domain in CONTRIB_DOMAINS:
        return None
    if domain in ("", "ai.onnx"):
        if opset is None:
            return "the model imports no default-domain opset"
        if not onnx.defs.has(node.op_type, max_inclusive_version=opset, domain=""):
            return f"'{node.op_type}' is not an ONNX op at opset {opset}"
        return None
    if domain == fused.DOMAIN and node.op_type == fused.FUSED_KERNEL:
        return _fused_problem(node)
    return f"ops of domain '{domain}' are not known to kompakt"


def _fused_problem(node: ir.Node) -> str | None:
    """A fused node's body must take the node's inputs and give its outputs, one for one."""
    attr = node.attributes.get("body")
    if attr is None or attr.type != ir.AttributeType.GRAPH:
        return "the fused node has no 'body' subgraph"
    body = attr.as_graph()
    if len(body.inputs) != len(node.inputs) or len(body.outputs) != len(node.outputs):
        return (
            f"the body takes {len(body.inputs)} inputs and gives {len(body.outputs)} outputs, "
            f"but the node has {len(node.inputs)} and {len(node.outputs)}"
        )
    return None
