"""merge-projections: projections that read the same activation become one wider GEMM.

Llama's q/k/v_proj read the same normed hidden state, as do gate/up_proj. As separate MatMuls each
re-reads the activation and pays its own launch; at decode (M = a few tokens) each is a thin GEMV
whose time is mostly fixed cost. Weights concatenated along N make one launch over [K, Nq+Nk+Nv]
(one dequant-matmul kernel after fuse-dequant-matmul); a Split hands each consumer its columns.
Column j of x @ [W1 | W2] is column j of x @ W1 or of x @ W2: the same numbers, up to the order
in which a GEMM of another width sums over K (float: ~1 ulp).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.ir.builder import constant, first_in_graph, unique_name
from kompakt.ir.metadata import copy_module, module_of
from kompakt.ir.tensors import from_torch, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.quantize.emit import FLOAT_WEIGHT, QUANT_KEY
from kompakt.passes.quantize.layers import LM_HEAD_NAMES
from kompakt.passes.registry import register_pass

MERGED_KEY = "kompakt.merged"
"""Node metadata on the merged nodes: JSON list of the module paths (or node names) merged."""

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)
_SPLIT_SIZES_OPSET = 13  # Split takes its sizes as an input (not an attribute) from opset 13


@register_pass
@dataclass(frozen=True)
class MergeProjections(Pass):
    """Merge MatMuls that read the same activation into one MatMul followed by a Split.

    Before: q = MatMul(x, DequantizeLinear(Qq: i4[K, Nq], Sq: [K/g, Nq], Zq, axis=0, block_size=g))
            k = MatMul(x, DequantizeLinear(Qk: i4[K, Nk], Sk, Zk, axis=0, block_size=g))
            v = MatMul(x, DequantizeLinear(Qv: i4[K, Nv], Sv, Zv, axis=0, block_size=g))
    After:  w = DequantizeLinear(Concat_N(Qq, Qk, Qv), Concat_N(Sq, Sk, Sv), Concat_N(Zq, Zk, Zv),
                                axis=0, block_size=g)
            q, k, v = Split(MatMul(x, w), [Nq, Nk, Nv], axis=-1)

    Float weights are concatenated the same way. Weights merge only when they agree on everything
    the one DequantizeLinear must share: the integer dtype, axis, block size, scale dtype, whether
    a zero point exists, K, and the bits/grouping recorded by the quantization pass; a weight that
    differs is left alone, with a note saying in what. Bias Adds stay after the Split (each
    consumer keeps its own), the output projection (``lm_head``) is never merged, and a weight
    with another use (tied to an embedding) is left alone. The new nodes take the first
    projection's module path and list every merged one under ``kompakt.merged``.

    Run it after the weight-compression passes (they pick layers by module path, and a merged
    node carries only its first projection's) and before fuse-dequant-matmul.

    Args:
        min_group: Merge only groups of at least this many projections.
    """

    name: ClassVar[str] = "merge-projections"
    min_group: int = 2

    def __post_init__(self) -> None:
        if self.min_group < 2:
            raise ValueError(
                f"min-group must be at least 2 (a group of one is not a merge), got {self.min_group}"
            )

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < _SPLIT_SIZES_OPSET:
            return PassResult(notes=[f"opset {opset} < 13: Split takes no sizes input there"])
        by_input: dict[int, list[ir.Node]] = {}
        for node in graph:
            if _is_plain_matmul(node):
                by_input.setdefault(id(node.inputs[0]), []).append(node)
        merged, notes, records = 0, [], []
        for matmuls in by_input.values():
            if len(matmuls) < self.min_group:
                continue
            groups, refused = _partition(matmuls)
            for group in groups:
                if len(group) >= self.min_group:
                    records.append(_merge(graph, group))
                    merged += len(group)
            notes.extend(refused)
        return PassResult(
            changed=bool(records),
            stats={"groups": len(records), "merged": merged, "kept": len(notes)},
            notes=notes,
            records=records,
        )


@dataclass
class _Candidate:
    matmul: ir.Node
    dq: ir.Node | None  # the weight's DequantizeLinear; None for a float weight
    key: dict[str, object]  # what must be equal for two weights to share one DequantizeLinear

    @property
    def label(self) -> str:
        return module_of(self.matmul) or self.matmul.name or "?"

    @property
    def n(self) -> int:
        weight = self.dq.inputs[0] if self.dq is not None else self.matmul.inputs[1]
        return weight.const_value.shape[1]

    def constants(self) -> list[ir.Value]:
        """The constant inputs the merge concatenates: the weight, or q, scale [, zero point]."""
        if self.dq is None:
            return [self.matmul.inputs[1]]
        return [v for v in self.dq.inputs if v is not None]


def _is_plain_matmul(node: ir.Node) -> bool:
    return (
        node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        and len(node.inputs) == 2
        and all(v is not None for v in node.inputs)
    )


def _candidate(matmul: ir.Node) -> _Candidate | str | None:
    """The MatMul as a merge candidate; a reason (str) when it is a projection we must not merge;
    None when it is no projection at all (its weight is computed, e.g. attention's Q @ Kᵀ)."""
    weight = matmul.inputs[1]
    dq = weight.producer()
    if dq is None:
        if weight.const_value is None or weight.dtype not in _FLOAT:
            return None
        if len(weight.const_value.shape) != 2:
            return None
        key = {"weight": "float", "dtype": weight.dtype.name, "K": weight.const_value.shape[0]}
    elif dq.op_type == "DequantizeLinear" and dq.domain in ("", "ai.onnx"):
        key_or_reason = _dequantize_key(dq)
        if isinstance(key_or_reason, str) or key_or_reason is None:
            return key_or_reason
        key = key_or_reason
    else:
        return None
    module = module_of(matmul)
    if module.rsplit(".", 1)[-1] in LM_HEAD_NAMES:
        return "the output projection is never merged"
    if len(weight.uses()) != 1 or weight in matmul.graph.outputs:
        return "its weight has another use (tied?)"
    return _Candidate(matmul, dq, key)


def _dequantize_key(dq: ir.Node) -> dict[str, object] | str | None:
    q, scale = dq.inputs[0], dq.inputs[1]
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if q is None or q.const_value is None or len(q.const_value.shape) != 2:
        return None
    if scale is None or any(v.const_value is None for v in (scale, zero) if v is not None):
        return "its scale or zero point is not a constant"
    axis_attr, block_attr = dq.attributes.get("axis"), dq.attributes.get("block_size")
    axis = 1 if axis_attr is None else axis_attr.value
    block = 0 if block_attr is None else block_attr.value
    rank = len(scale.const_value.shape)
    # The scale (and zero point) must have an N axis to concatenate along: [N] with axis 1, or
    # [K/g, N] with groups along K (axis 0). A per-tensor scale or groups along N do not.
    if scale.const_value.size == 1 and q.const_value.shape[1] != 1:
        return "its scale is per-tensor (merging needs one per output column)"
    if not ((rank == 1 and axis in (1, -1) and not block) or (rank == 2 and axis == 0 and block)):
        return f"its scales (shape {list(scale.const_value.shape)}, axis {axis}) have no N axis"
    meta = json.loads(dq.metadata_props.get(QUANT_KEY, "{}"))
    meta.pop("method", None)  # GPTQ and round-to-nearest weights on one grid merge fine
    return {
        "weight": "quantized",
        "dtype": q.dtype.name,
        "K": q.const_value.shape[0],
        "axis": axis,
        "block_size": block,
        "scale dtype": scale.dtype.name,
        "zero point": zero.dtype.name if zero is not None else "none",
        "quantization": json.dumps(meta, sort_keys=True),
    }


def _partition(matmuls: list[ir.Node]) -> tuple[list[list[_Candidate]], list[str]]:
    """The MatMuls reading one activation, in groups of equal keys (largest first), and a note
    for each projection that cannot join the largest group."""
    candidates, notes = [], []
    for matmul in matmuls:
        cand = _candidate(matmul)
        if isinstance(cand, _Candidate):
            candidates.append(cand)
        elif isinstance(cand, str):
            notes.append((module_of(matmul) or matmul.name, cand))
    groups: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        groups.setdefault(json.dumps(cand.key, sort_keys=True), []).append(cand)
    ordered = sorted(groups.values(), key=len, reverse=True)  # stable: ties keep graph order
    if len(candidates) + len(notes) < 2:
        return ordered, []  # one projection alone: it had nothing to merge with
    main = ordered[0][0] if ordered else None
    for group in ordered[1:]:
        for cand in group:
            diff = ", ".join(
                f"{name} {cand.key.get(name)} vs {main.key.get(name)}"
                for name in main.key
                if cand.key.get(name) != main.key.get(name)
            )
            notes.append((cand.label, f"weights differ from {main.label}'s in {diff}"))
    return ordered, [f"{label}: not merged: {why}" for label, why in notes]


def _merge(graph: ir.Graph, group: list[_Candidate]) -> dict[str, object]:
    first = group[0]
    labels = [c.label for c in group]
    base = _merged_name(labels)
    merged_meta = json.dumps(labels)
    sizes = [c.n for c in group]
    new_nodes: list[ir.Node] = []

    def concat(index: int, suffix: str) -> ir.Value:
        parts = [c.constants()[index] for c in group]
        tensors = [to_torch(p.const_value) for p in parts]
        axis = tensors[0].dim() - 1  # N is the last axis of q, the weight, and the scales
        return constant(graph, torch.cat(tensors, dim=axis), f"{base}{suffix}", parts[0].dtype)

    if first.dq is None:
        weight = concat(0, ".weight")
    else:
        inputs = [concat(0, ".weight_quantized"), concat(1, ".weight_scale")]
        if len(first.constants()) > 2:
            inputs.append(concat(2, ".weight_zero_point"))
        dq = ir.node(
            "DequantizeLinear",
            inputs,
            attributes={a.name: a for a in first.dq.attributes.values()},
            name=f"{base}/dequantize_weight",
        )
        copy_module(first.dq, dq)
        dq.metadata_props.update(_merged_quant_meta(group))
        _merge_float_weights(dq, group)
        weight = dq.outputs[0]
        weight.name = unique_name(graph, f"{base}.weight_dequantized")
        weight.type = first.dq.outputs[0].type
        new_nodes.append(dq)
    weight.shape = ir.Shape([first.key["K"], sum(sizes)])
    matmul = ir.node("MatMul", [first.matmul.inputs[0], weight], name=f"{base}/MatMul")
    y = matmul.outputs[0]
    y.name, y.type = unique_name(graph, f"{base}_out"), first.matmul.outputs[0].type
    shape = first.matmul.outputs[0].shape
    y.shape = ir.Shape([*list(shape)[:-1], sum(sizes)]) if shape is not None else None
    split_sizes = constant(graph, torch.tensor(sizes, dtype=torch.int64), f"{base}.split_sizes")
    split = ir.node(
        "Split",
        [y, split_sizes],
        attributes={"axis": -1},
        num_outputs=len(group),
        name=f"{base}/Split",
    )
    copy_module(first.matmul, matmul, split)
    new_nodes += [matmul, split]
    for node in new_nodes:
        node.metadata_props[MERGED_KEY] = merged_meta
    old_outputs = [c.matmul.outputs[0] for c in group]
    for old, new in zip(old_outputs, split.outputs, strict=True):
        new.type, new.shape = old.type, old.shape
        name, old.name = old.name, f"{old.name}_unmerged"  # frees the name for the Split output
        new.name = name
    graph.insert_before(first_in_graph(graph, [c.matmul for c in group]), new_nodes)
    ir.convenience.replace_all_uses_with(old_outputs, split.outputs, replace_graph_outputs=True)
    old_constants = [v for c in group for v in c.constants()]
    graph.remove([c.matmul for c in group], safe=True)
    graph.remove([c.dq for c in group if c.dq is not None], safe=True)
    for value in old_constants:
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
    return {"modules": labels, "shape": [first.key["K"], sum(sizes)], "split": sizes}


def _merged_name(labels: list[str]) -> str:
    """``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b.q_proj_k_proj``: the shared parent, then the
    projections' own names (a value name readers of the graph can trace back)."""
    parts = [label.split(".") for label in labels]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    parent = ".".join(parts[0][:common])
    leaves = "_".join(".".join(p[common:]) for p in parts)
    return f"{parent}.{leaves}" if parent else leaves


def _merged_quant_meta(group: list[_Candidate]) -> dict[str, str]:
    metas = [json.loads(c.dq.metadata_props.get(QUANT_KEY, "{}")) for c in group]
    if not metas[0]:
        return {}
    methods = sorted({m.get("method") for m in metas if m.get("method")})
    if methods:
        metas[0]["method"] = "+".join(methods)
    return {QUANT_KEY: json.dumps(metas[0], sort_keys=True)}


def _merge_float_weights(dq: ir.Node, group: list[_Candidate]) -> None:
    """Keeps the float weights merged too, for passes that need W - Ŵ later (keep-float-weights)."""
    kept = [c.dq.meta.get(FLOAT_WEIGHT) for c in group]
    if all(w is not None for w in kept):
        dq.meta[FLOAT_WEIGHT] = from_torch(torch.cat([to_torch(w) for w in kept], dim=1))
