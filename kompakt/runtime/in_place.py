"""In-place cache updates: a ScatterND that may write into the graph input it updates.

A graph captured with a static KV cache (kompakt.lowering.kv_cache) has no mutation: each layer's
new keys and values are written out of place, ``present = ScatterND(past, positions, new)``
(between Transposes), and the caller feeds ``present`` back as the next step's ``past``. Run as
written, every decode step copies every cache, which costs more memory traffic than reading the
4-bit weights once a cache holds a few hundred tokens.

A caller that will not read its feeds again can say so: ``run(feeds, donate=True)`` (`generate`
does). Then each ScatterND found by `donatable_updates` writes its rows into the fed tensor and
returns it (through the Transposes, which are views), and no cache is copied. Only a ScatterND
whose data is a graph input reached through view ops, each value read by nothing else (``Shape``
aside), qualifies: nothing else can observe the overwrite.
"""

from __future__ import annotations

import onnx_ir as ir

VIEW_OPS = frozenset({"Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
"""Ops the reference runtime runs as views of their first input (Reshape when it can)."""


def donatable_updates(graph: ir.Graph) -> dict[int, str]:
    """id(ScatterND node) -> the name of the graph input it may overwrite when donated."""
    found: dict[int, str] = {}
    for node in graph:
        if node.op_type != "ScatterND" or node.domain not in ("", "ai.onnx"):
            continue
        reduction = node.attributes.get("reduction")
        if reduction is not None and reduction.as_string() != "none":
            continue
        value = node.inputs[0]
        while (
            value is not None
            and _read_once(value)
            and value.producer() is not None
            and value.producer().op_type in VIEW_OPS
            and value.producer().domain in ("", "ai.onnx")
        ):
            value = value.producer().inputs[0]
        if value is not None and value.is_graph_input() and _read_once(value):
            found[id(node)] = value.name
    return found


def _read_once(value: ir.Value) -> bool:
    """One node reads the value's elements (Shape and Size read only its shape, which an
    in-place write keeps), and it is not a graph output."""
    readers = [u.node for u in value.uses() if u.node.op_type not in ("Shape", "Size")]
    return len(readers) == 1 and not value.is_graph_output()
