"""``kompakt::FusedKernel``: a group of nodes that runs as one kernel, with its subgraph as meaning.

Fusion passes replace a connected group of nodes with one node

    y = kompakt::FusedKernel[pattern="dequant_matmul", body=<subgraph>, opset=21](x, Wq, s, ...)

whose ``body`` attribute holds the original nodes, reading the node's inputs in order and
producing its outputs in order. The reference runtime runs a fused node by running its body, so
every fusion is checked against the unfused graph; the Triton backend runs the kernel family that
``pattern`` names; export inlines the body again, so the ONNX file stays standard.

Attributes: ``body`` (GRAPH), ``pattern`` (STRING, the kernel family's name), ``opset`` (INT,
the default-domain opset of the body's nodes), and any pattern-specific parameters the fusion pass
read off the body (``act``, ``bits``, ...) so kernels need not rediscover them.

Value names stay unique across scopes: body inputs are named ``<outer name>:in``, the body's own
copies of the group's outputs ``<name>:out``; the fused node's outputs keep the original names, so
graph outputs and downstream nodes see no change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.metadata import module_of

DOMAIN = "kompakt"
FUSED_KERNEL = "FusedKernel"


def is_fused(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == FUSED_KERNEL


def pattern_of(node: ir.Node) -> str:
    attr = node.attributes.get("pattern")
    return attr.as_string() if attr is not None else ""


def body_of(node: ir.Node) -> ir.Graph:
    attr = node.attributes.get("body")
    if attr is None:
        raise KompaktError(f"fused node '{node.name}' has no 'body' subgraph")
    return attr.as_graph()


def fuse_nodes(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    pattern: str,
    attributes: Iterable[ir.Attr] = (),
) -> ir.Node:
    """Replaces ``nodes`` (a connected group of ``model``'s main graph) with one fused node.

    The caller guarantees the group is convex: no path leaves the group and comes back into it
    (every fusion pattern is a chain or a diamond whose inner values it owns).
    """
    graph = model.graph
    members = {id(n) for n in nodes}
    ordered = [n for n in graph if id(n) in members]
    if len(ordered) != len(members):
        raise KompaktError(f"cannot fuse '{pattern}': some nodes are not in the main graph")
    externals = group_inputs(ordered)
    graph_outputs = {id(v) for v in graph.outputs}
    escaping = [
        value
        for node in ordered
        for value in node.outputs
        if id(value) in graph_outputs or any(id(user) not in members for user, _ in value.uses())
    ]
    if not escaping:
        raise KompaktError(f"cannot fuse '{pattern}': the group's results are not used")

    # The deepest module path names the group (a q_proj MatMul, not the layer its residual
    # Add belongs to).
    primary = max(ordered, key=lambda n: module_of(n).count(".") + bool(module_of(n)))
    module = module_of(primary)
    graph.remove(ordered, safe=False)
    body_inputs = [
        ir.Value(name=f"{v.name}:in", shape=v.shape, type=v.type, const_value=None)
        for v in externals
    ]
    replacement = {id(v): b for v, b in zip(externals, body_inputs, strict=True)}
    for node in ordered:
        for index, value in enumerate(node.inputs):
            if value is not None and id(value) in replacement:
                node.replace_input_with(index, replacement[id(value)])

    fused = ir.Node(
        DOMAIN,
        FUSED_KERNEL,
        externals,
        [
            ir.AttrString("pattern", pattern),
            ir.AttrInt64("opset", model.opset_imports.get("", 21)),
            *attributes,
        ],
        num_outputs=len(escaping),
        name=_node_name(graph, pattern, module),
        metadata_props=dict(primary.metadata_props),
    )
    for inner, outer in zip(escaping, fused.outputs, strict=True):
        name = inner.name
        for user, index in list(inner.uses()):
            if id(user) not in members:
                user.replace_input_with(index, outer)
        for i, value in enumerate(graph.outputs):
            if value is inner:
                graph.outputs[i] = outer
        inner.name = f"{name}:out"
        outer.name, outer.shape, outer.type = name, inner.shape, inner.type
    body = ir.Graph(body_inputs, escaping, nodes=ordered, name=pattern)
    fused.attributes["body"] = ir.AttrGraph("body", body)
    graph.append(fused)
    graph.sort()
    model.opset_imports.setdefault(DOMAIN, 1)
    return fused


def _node_name(graph: ir.Graph, pattern: str, module: str) -> str:
    """``<module>/fused_<pattern>``, numbered when the graph already has a node so named."""
    base = f"{module}/fused_{pattern}" if module else f"fused_{pattern}"
    taken = {n.name for n in graph}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def group_inputs(ordered: Sequence[ir.Node]) -> list[ir.Value]:
    """The values a group of nodes (in graph order) reads from outside itself, in first-use
    order: what `fuse_nodes` makes the fused node's inputs."""
    members = {id(n) for n in ordered}
    externals: list[ir.Value] = []
    seen: set[int] = set()
    for node in ordered:
        for value in node.inputs:
            if value is None or id(value) in seen:
                continue
            producer = value.producer()
            if producer is None or id(producer) not in members:
                seen.add(id(value))
                externals.append(value)
    return externals


def inline_fused(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every fused node replaced by its body's nodes (standard ONNX).

    Weights are shared with ``model``, not copied. Returns ``model`` itself if nothing is fused.
    """
    if not any(is_fused(n) for n in model.graph):
        return model
    model = model.clone()
    graph = model.graph
    for fused in [n for n in graph if is_fused(n)]:
        body = body_of(fused)
        mapping = {id(b): v for b, v in zip(body.inputs, fused.inputs, strict=True)}
        inner_nodes = list(body)
        body.remove(inner_nodes, safe=False)
        inner_outputs = list(body.outputs)
        body.outputs.clear()  # a value may be the output of one graph only
        for node in inner_nodes:
            for index, value in enumerate(node.inputs):
                if value is not None and id(value) in mapping:
                    node.replace_input_with(index, mapping[id(value)])
        for inner, outer in zip(inner_outputs, fused.outputs, strict=True):
            for user, index in list(outer.uses()):
                user.replace_input_with(index, inner)
            for i, value in enumerate(graph.outputs):
                if value is outer:
                    graph.outputs[i] = inner
            name = outer.name
            outer.name = f"{name}:fused"
            inner.name = name
        graph.insert_before(fused, inner_nodes)
        graph.remove(fused, safe=False)
    if not any(n.domain == DOMAIN for n in graph):
        model.opset_imports.pop(DOMAIN, None)
    return model
