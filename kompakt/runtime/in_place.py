"""In-place cache updates: a ScatterND that may write into the graph input it updates.

A graph captured with a static KV cache (kompakt.lowering.kv_cache) has no mutation: each layer's
new keys and values are written out of place, ``present = ScatterND(past, positions, new)``
(between Transposes), and the caller feeds ``present`` back as the next step's ``past``. Run as
written, every decode step copies every cache, which costs more memory traffic than reading the
4-bit weights once a cache holds a few hundred tokens.

A caller that will not read its feeds again can say so: ``run(feeds, donate=True)`` (`generate`
does). Then each ScatterND found by `donatable_updates` writes its rows into the fed tensor and
returns it (through the Transposes, which are views), and no cache is copied. A fused node that
took such writes in (fuse-rotary's KV append: inputs with `CACHE_ROLES`) does the same through
its kernel's ``in_place`` variant, where its backend has one (the Triton binder's; the reference
runs the node's body, out of place). Only a ScatterND
whose data is a graph input reached through view ops, each value read by nothing else (``Shape``
aside), qualifies: nothing else can observe the overwrite.
"""

from __future__ import annotations

import onnx_ir as ir

VIEW_OPS = frozenset({"Transpose", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
"""Ops the reference runtime runs as views of their first input (Reshape when it can)."""

CACHE_ROLES = ("k_cache", "v_cache")
"""Input roles of a fused node that writes into those inputs' copies (fuse-rotary's KV append);
its kernel's ``in_place`` variant writes into the inputs themselves."""


def donatable_updates(graph: ir.Graph) -> dict[int, tuple[str, ...]]:
    """id(node) -> the names of the graph inputs it may overwrite when donated: a ScatterND's
    data, or the caches of a fused node with `CACHE_ROLES` inputs (all of them, or none)."""
    found: dict[int, tuple[str, ...]] = {}
    for node in graph:
        if node.op_type == "ScatterND" and node.domain in ("", "ai.onnx"):
            reduction = node.attributes.get("reduction")
            if reduction is not None and reduction.as_string() != "none":
                continue
            names = [_donated(node.inputs[0])]
        elif node.op_type == "FusedKernel" and node.domain == "kompakt":
            roles = node.attributes.get("roles")
            named = list(roles.as_strings()) if roles is not None else []
            names = [
                _donated(v) for v, r in zip(node.inputs, named, strict=False) if r in CACHE_ROLES
            ]
        else:
            continue
        if names and None not in names:
            found[id(node)] = tuple(names)
    return found


def _donated(value: ir.Value | None) -> str | None:
    """The graph input ``value`` is a view of, read only on the way, or None."""
    while (
        value is not None
        and _read_once(value)
        and value.producer() is not None
        and value.producer().op_type in VIEW_OPS
        and value.producer().domain in ("", "ai.onnx")
    ):
        value = value.producer().inputs[0]
    if value is not None and value.is_graph_input() and _read_once(value):
        return value.name
    return None


def _read_once(value: ir.Value) -> bool:
    """One node reads the value's elements (Shape and Size read only its shape, which an
    in-place write keeps), and it is not a graph output."""
    readers = [u.node for u in value.uses() if u.node.op_type not in ("Shape", "Size")]
    return len(readers) == 1 and not value.is_graph_output()
