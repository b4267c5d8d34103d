"""The KV-cache writes a rotary q/k pair can take in (fuse-rotary's ``append_kv``).

A graph captured with a static cache (kompakt.lowering.kv_cache) writes each layer's new keys
and values with ``index_copy`` along the sequence axis, which exports per cache as::

    present = Transpose(ScatterND(Transpose(past, P), positions [S, 1], Transpose(new, Q)), P^-1)

P moves the sequence axis first (features stay last). For k, ``new`` is the rotated k, read by
that Transpose only, with Q = P = [2, 0, 1, 3] ([B, H, S, D] -> [S, B, H, D]): the kernel writes
k's rotated rows into the cache where the rotation would have written them. v's write is the
other ScatterND at the same positions from the same module (every layer writes at the same
positions; the module path tells the layers apart) with the same P; its ``new`` may come in any
layout Q that keeps features last. Nothing else may read the inner values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.metadata import module_of
from kompakt.passes.fuse.match import attr_ints, is_op, same_dim, single_consumer

K_PERM = [2, 0, 1, 3]
"""[B, H, S, D] -> [S, B, H, D]: how the rotated k must be moved for its cache write."""


@dataclass
class CacheWrites:
    """The two cache writes one q/k pair takes in: the nodes, the permutations, the values the
    fused node reads (caches, positions, v) and the updated caches it writes."""

    nodes: list[ir.Node]
    perm: list[int]
    v_perm: list[int]
    k_cache: ir.Value
    v_cache: ir.Value
    positions: ir.Value
    v: ir.Value
    k_present: ir.Value
    v_present: ir.Value

    ROLES: ClassVar[tuple[str, ...]] = ("k_cache", "v_cache", "positions", "v")
    """The fused node's input roles of `inputs`, in order (what codegen/rotary/bind.py reads)."""

    def inputs(self) -> tuple[ir.Value, ...]:
        """What the writes read from outside the rotary pair, in `ROLES` order."""
        return self.k_cache, self.v_cache, self.positions, self.v


def find_cache_writes(
    k_result: ir.Value, k: ir.Value, graph: ir.Graph, computed_from_pair: Callable
) -> CacheWrites | None:
    """The writes of ``k_result`` (the rotated k, rotated from ``k``) and of its layer's v, or
    None. ``computed_from_pair(value, nodes)`` says whether a value is computed from the pair
    and those nodes (then the fused node would feed itself)."""
    k_chain = _k_chain(k_result, graph)
    if k_chain is None:
        return None
    scatter, perm = k_chain["scatter"], k_chain["perm"]
    module = module_of(scatter)
    chains = [
        _scatter_chain(use.node, graph)
        for use in scatter.inputs[1].uses()
        if use.node is not scatter and use.idx == 1 and is_op(use.node, "ScatterND")
        and module and module_of(use.node) == module
    ]  # fmt: skip
    chains = [c for c in chains if c is not None and c["perm"] == perm]
    if len(chains) != 1:
        return None
    v_chain = chains[0]
    v_update = v_chain["scatter"].inputs[2].producer()
    v_perm = attr_ints(v_update, "perm") if is_op(v_update, "Transpose") else None
    v = v_update.inputs[0] if v_update is not None else None
    if v_perm is None or v_perm[3] != 3 or v is None or not _shaped_like_k(v, v_perm, k):
        return None
    if single_consumer(v_update.outputs[0], graph) is not v_chain["scatter"]:
        return None
    nodes = k_chain["nodes"] + v_chain["nodes"] + [v_update]
    found = CacheWrites(
        nodes, perm, v_perm, k_chain["cache"], v_chain["cache"], scatter.inputs[1], v,
        k_chain["present"], v_chain["present"],
    )  # fmt: skip
    if any(computed_from_pair(value, nodes) for value in found.inputs()):
        return None
    return found


def _k_chain(result: ir.Value, graph: ir.Graph) -> dict | None:
    """``Transpose(result, K_PERM) -> ScatterND updates`` and the rest of its cache write."""
    transpose = single_consumer(result, graph)
    if not is_op(transpose, "Transpose") or result.is_graph_output():
        return None
    scatter = single_consumer(transpose.outputs[0], graph)
    if attr_ints(transpose, "perm") != K_PERM or not is_op(scatter, "ScatterND"):
        return None
    if scatter.inputs[2] is not transpose.outputs[0]:
        return None
    found = _scatter_chain(scatter, graph)
    if found is None or found["perm"] != K_PERM:
        return None
    found["nodes"].append(transpose)
    return found


def _scatter_chain(scatter: ir.Node, graph: ir.Graph) -> dict | None:
    """``Transpose(ScatterND(Transpose(cache, P), positions [S, 1], ...), P^-1)`` around one
    ScatterND, with each inner value read only inside; None if it is not that."""
    reduction = scatter.attributes.get("reduction")
    if reduction is not None and reduction.as_string() != "none":
        return None
    data, positions = scatter.inputs[0], scatter.inputs[1]
    into = data.producer() if data is not None else None
    out = single_consumer(scatter.outputs[0], graph)
    if not is_op(into, "Transpose") or not is_op(out, "Transpose"):
        return None
    perm, back = attr_ints(into, "perm"), attr_ints(out, "perm")
    if perm is None or len(perm) != 4 or perm[3] != 3 or back is None:
        return None
    if [perm.index(i) for i in range(4)] != back or single_consumer(data, graph) is not scatter:
        return None
    if scatter.outputs[0].is_graph_output():
        return None
    pos_shape = positions.shape if positions is not None else None
    if pos_shape is None or len(pos_shape) != 2 or pos_shape[1] != 1:
        return None
    return {
        "scatter": scatter, "perm": perm, "cache": into.inputs[0], "present": out.outputs[0],
        "nodes": [into, scatter, out],
    }  # fmt: skip


def _shaped_like_k(v: ir.Value, v_perm: list[int], k: ir.Value) -> bool:
    """Whether v, moved by ``v_perm`` to [S, B, H, D], is k's [B, H, S, D] in that order."""
    if v.shape is None or k.shape is None or len(v.shape) != 4 or v.dtype != k.dtype:
        return False
    moved = [v.shape[i] for i in v_perm]  # [S, B, H, D]
    b, h, s, d = k.shape
    return all(same_dim(x, y) for x, y in zip(moved, (s, b, h, d), strict=True))
