"""fuse-attention: the core of scaled dot-product attention, as torch.onnx exports it.

Exported, ``F.scaled_dot_product_attention`` is a dozen ops: k transposed through a Reshape /
Transpose / Reshape whose shapes are computed at run time, q and k each scaled by sqrt(scale), the
[B, H, Sq, Skv] scores written, masked, soft-maxed, NaN-guarded and read back, and for
grouped-query attention k and v first repeated to every query head. Fused, the ``attention``
codegen family streams K/V through one flash kernel: the scores never reach memory and the
repeated K/V are never built (a query head reads its kv head by index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.fused import fuse_nodes
from kompakt.ir.tensors import to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.match import Roles, attr_ints, const_ints, const_tensor, is_op
from kompakt.passes.registry import register_pass

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)
# Stand-ins for the dims of k in shape computations: far from any literal a shape holds.
_MARK = 1 << 40


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Fuse MatMul(q, k^T) -> scale -> [Add mask] -> Softmax -> [NaN guard] -> MatMul(., v).

    Before: k' = Reshape(Expand(Unsqueeze(k, [2]), [B, Hkv, n, S, D]), [B, Hkv * n, S, D])
            kt = Reshape(Transpose(Reshape(k', [-1, S, D]), [0, 2, 1]), [B, Hq, D, S])
            p  = Softmax(Add(MatMul(Mul(q, c), Mul(kt, c)), mask), axis=-1)
            y  = MatMul(Where(IsNaN(p), 0, p), v' (v repeated as k))
    After:  y = kompakt::FusedKernel[pattern="attention", scale=c*c, causal=0, has_mask=1,
                    roles=["k", "shape", ..., "v", ..., "q", "scale", "mask", "zero"]](k, ...)

    Matched: the scale as Mul/Div of q, of k (before or after its transpose) and/or of the scores
    by scalar constants (``scale`` is their product); k^T as Transpose(perm=[0, 1, 3, 2]) or the
    Reshape/Transpose/Reshape above, whose shape operands (Shape/Slice/Concat of constants) are
    evaluated on stand-ins for k's dims to prove they are [-1, S, D] and [B, H, D, S]; at most one
    Add, the mask, before the softmax; Softmax over the last axis; Where(IsNaN(p), 0, p). GQA's
    Unsqueeze(axis 2) -> Expand -> Reshape of k and v joins the group when the inferred shapes
    show it repeats each kv head n times in place (query head h reads kv head h // n, the kernel's
    index math); otherwise the repeated k and v are the kernel's inputs.

    The mask carries causality (``causal=0``). A masked group needs the NaN guard: a row the mask
    hides entirely is NaN after a plain softmax but 0 from the kernel. Groups without it, with the
    scale after the mask, a softmax over another axis, an intermediate read outside the group, or
    shapes other than q [B, Hq, Sq, D], k and v [B, Hkv, Skv, D] are kept, with a note. The body
    is the unfused graph; the kernel equals it up to rounding for finite inputs (it scales fp32
    scores by c*c where the body scales q and k by c, and NaN/inf inputs are not guarded alike).
    """

    name: ClassVar[str] = "fuse-attention"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 21)
        fused, kept = 0, []
        for node in list(graph):
            if node.graph is not graph or not is_op(node, "Softmax"):
                continue  # (a node already taken into a group has its body as graph)
            found = _match(node, graph, opset)
            if found is None:
                continue  # a softmax that feeds no MatMul: not attention
            if isinstance(found, str):
                kept.append(f"{node.name}: {found}")
                continue
            _fuse(model, found)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused, "kept": len(kept)}, notes=kept)


@dataclass
class _Group:
    nodes: list[ir.Node] = field(default_factory=list)
    roles: Roles = field(default_factory=Roles)
    scale: float = 1.0
    nan_rows: bool = False  # unguarded masked softmax: a row masked whole is NaN, as in the graph

    def take(self, nodes: list[ir.Node], shapes: list[ir.Value | None] = ()) -> None:
        self.nodes.extend(n for n in nodes if n not in self.nodes)
        for value in shapes:
            self.roles.add(value, "shape")


def _match(softmax: ir.Node, graph: ir.Graph, opset: int) -> _Group | str | None:
    group = _Group(nodes=[softmax])
    probs = weights = softmax.outputs[0]
    guard = _nan_guard(probs)
    if guard is not None:
        group.take(guard[:2])
        group.roles.add(guard[2], "zero")
        weights = guard[1].outputs[0]
    readers = [u.node for u in weights.uses()]
    pv = next((n for n in readers if is_op(n, "MatMul") and n.inputs[0] is weights), None)
    if pv is None:
        return None
    group.take([pv])
    x = softmax.inputs[0]
    rank = len(x.shape) if x is not None and x.shape is not None else None
    axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
    if rank != 4 or axis % rank != 3:
        return f"Softmax over axis {axis} of a rank-{rank} tensor (the kernel: 4-D, last axis)"
    mask, scores = None, x
    add = x.producer()
    if is_op(add, "Add") and len(add.inputs) == 2:
        for s, m in (add.inputs, add.inputs[::-1]):
            if is_op(_peel(s, group.scale)[0].producer(), "MatMul"):
                scores, mask = s, m
                group.take([add])
                group.roles.add(mask, "mask")
                break
    scores, group.scale, peeled = _peel(scores, group.scale, group)
    qk = scores.producer()
    if not is_op(qk, "MatMul"):
        return "the scores are not MatMul(q, k^T) through scalar scales and one mask Add"
    group.take([qk, *peeled])
    q, group.scale, peeled = _peel(qk.inputs[0], group.scale, group)
    group.take(peeled)
    kt, group.scale, peeled = _peel(qk.inputs[1], group.scale, group)
    group.take(peeled)
    k_rep = _untranspose(kt, group)
    if isinstance(k_rep, str):
        return k_rep
    k_rep, group.scale, peeled = _peel(k_rep, group.scale, group)
    group.take(peeled)
    k, v = k_rep, pv.inputs[1]
    k_raw, v_raw = _unrepeat(k_rep), _unrepeat(v)
    if k_raw is not None and v_raw is not None and k_raw[1] == v_raw[1]:
        k, v = k_raw[0], v_raw[0]
        group.take(*k_raw[2:])
        group.take(*v_raw[2:])
    reason = _check(q, k, v, k_rep, pv, qk, mask, x)
    if reason:
        return reason
    # Without Where(IsNaN(p), 0, p) a row whose mask is -inf everywhere is NaN in the graph;
    # the kernel gives 0 there, so the binder writes NaN back into such rows.
    group.nan_rows = mask is not None and guard is None
    for name, value in (("q", q), ("k", k), ("v", v)):
        group.roles.add(value, name)
    inside = {id(n) for n in group.nodes}
    for value in (v for n in group.nodes if n is not pv for v in n.outputs):
        if value in graph.outputs or any(id(u.node) not in inside for u in value.uses()):
            return f"'{value.name}' is read outside the attention group too"
    return group


def _check(q, k, v, k_rep, pv, qk, mask, summed) -> str | None:
    """Shapes the kernel takes: q [B, Hq, Sq, D], k = v [B, Hkv, Skv, D], Hkv | Hq, no other
    broadcast in the MatMuls, a mask that broadcasts into the scores."""
    shapes = [t.shape for t in (q, k, v, k_rep, pv.outputs[0], qk.outputs[0], summed)]
    if any(s is None or len(s) != 4 for s in shapes):
        return "q, k, v or the scores are not 4-D tensors of known rank"
    qs, ks, vs, reps, out, scores, summed_s = shapes
    if not (q.dtype in _FLOAT and q.dtype == k.dtype == v.dtype):
        return f"q, k, v are {q.dtype}, {k.dtype}, {v.dtype} (one float type needed)"
    head_dim = qs[3]
    if not isinstance(head_dim, int) or not all(_same(t[3], head_dim) for t in (ks, vs)):
        return f"head dims q {qs[3]}, k {ks[3]}, v {vs[3]} are not one static D"
    if not all(_same(a, b) for a, b in zip(ks, vs, strict=True)):
        return f"k {list(ks)} and v {list(vs)} differ in shape"
    if not (_same(qs[0], ks[0]) and (_same(reps[1], qs[1]) or reps[1] == 1)):
        return f"q {list(qs)} and k {list(reps)} broadcast in batch or heads"
    if not all(_same(a, b) for a, b in zip(out, [*qs[:3], head_dim], strict=True)):
        return f"the output {list(out)} is not [B, Hq, Sq, D] of q {list(qs)}"
    if mask is not None:
        mask_rank = len(mask.shape) if mask.shape is not None else 5
        if mask_rank > 4 or not all(_same(a, b) for a, b in zip(summed_s, scores, strict=True)):
            return f"the mask {mask.shape} does not broadcast into the scores {list(scores)}"
    return None


def _nan_guard(probs: ir.Value) -> tuple[ir.Node, ir.Node, ir.Value] | None:
    """(IsNaN, Where, zero) of Where(IsNaN(p), 0, p) when p is read by nothing else."""
    readers = [u.node for u in probs.uses()]
    isnan = next((n for n in readers if is_op(n, "IsNaN")), None)
    if isnan is None or len(readers) != 2 or len(isnan.outputs[0].uses()) != 1:
        return None
    where = isnan.outputs[0].uses()[0].node
    if not is_op(where, "Where") or where not in readers or where.inputs[2] is not probs:
        return None
    return (isnan, where, where.inputs[1]) if _scalar(where.inputs[1]) == 0.0 else None


def _peel(value: ir.Value, scale: float, group: _Group | None = None):
    """Steps over Mul/Div of ``value`` by scalar constants (read by nothing else); returns the
    value before them, ``scale`` times their factor, and the nodes stepped over."""
    nodes = []
    while value is not None and (node := value.producer()) is not None and len(value.uses()) <= 1:
        if is_op(node, "Mul") or is_op(node, "Div"):
            a, b = node.inputs
            c = _scalar(b, a)
            if node.op_type == "Mul" and c is None and (c := _scalar(a, b)) is not None:
                a, b = b, a
            if c is not None and math.isfinite(c) and c != 0.0:
                scale *= c if node.op_type == "Mul" else 1.0 / c
                nodes.append(node)
                if group is not None:
                    group.roles.add(b, "scale")
                value = a
                continue
        break
    return value, scale, nodes


def _untranspose(kt: ir.Value, group: _Group) -> ir.Value | str:
    """k for k^T = Transpose(k, [0, 1, 3, 2]) or torch.onnx's rank-generic Reshape/Transpose/
    Reshape, whose shape operands must evaluate to [-1, S, D] and [B, H, D, S] of k."""
    node = kt.producer()
    if is_op(node, "Transpose") and list(attr_ints(node, "perm") or []) == [0, 1, 3, 2]:
        group.take([node])
        return node.inputs[0]
    why = "k^T is neither Transpose(k, [0, 1, 3, 2]) nor Reshape(Transpose(Reshape(k)))"
    transpose = node.inputs[0].producer() if is_op(node, "Reshape") else None
    if not is_op(transpose, "Transpose") or list(attr_ints(transpose, "perm") or []) != [0, 2, 1]:
        return why
    first = transpose.inputs[0].producer()
    if not is_op(first, "Reshape") or len(first.outputs[0].uses()) != 1:
        return why
    k = first.inputs[0]
    if k.shape is None or len(k.shape) != 4:
        return "k^T is the transpose of a tensor of unknown rank"
    dims, shape_nodes = [_MARK + i for i in range(4)], []
    squeezed = _evaluate(first.inputs[1], k, dims, shape_nodes)
    restored = _evaluate(node.inputs[1], k, dims, shape_nodes)
    if squeezed != [-1, dims[2], dims[3]] or restored != [*dims[:2], dims[3], dims[2]]:
        return "the Reshapes around k's Transpose do not provably swap its last two axes"
    group.take([first, transpose, node, *shape_nodes])
    operands = [first.inputs[1], node.inputs[1], *(v for n in shape_nodes for v in n.inputs)]
    group.take([], [v for v in operands if v is not None and v.dtype == _D.INT64])
    return k


def _evaluate(value: ir.Value, k: ir.Value, dims: list[int], nodes: list[ir.Node]):
    """A 1-D int shape computed from Shape(k) and constants, with ``dims`` standing for k's dims;
    None for anything else. Collects the nodes it went through."""
    const = const_ints(value)
    if const is not None:
        return const
    node = value.producer()
    result = None
    if is_op(node, "Shape") and node.inputs[0] is k:
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
        result = dims[start:end]
    elif is_op(node, "Concat") and node.attributes.get_int("axis", 0) == 0:
        parts = [_evaluate(v, k, dims, nodes) for v in node.inputs]
        result = None if any(p is None for p in parts) else [d for p in parts for d in p]
    elif is_op(node, "Slice") and len(node.inputs) >= 3:
        data = _evaluate(node.inputs[0], k, dims, nodes)
        bounds = [const_ints(v) for v in node.inputs[1:]]  # constant bounds only
        starts, ends, axes, steps = (bounds + [None, None])[:4]
        one_axis = starts and ends and len(starts) == len(ends) == 1 and axes in (None, [0], [-1])
        if data is not None and one_axis and steps in (None, [1]):
            result = data[starts[0] : ends[0]]  # Python clamps as ONNX Slice does
    if result is not None and node not in nodes:
        nodes.append(node)
    return result


def _unrepeat(value: ir.Value):
    """(kv, n, nodes, shape operands) when ``value`` = Reshape(Expand(Unsqueeze(kv, [2]))) repeats
    each head of kv [B, H, S, D] n times in place, as the inferred shapes show; else None."""
    reshape = value.producer()
    expand = reshape.inputs[0].producer() if is_op(reshape, "Reshape") else None
    unsqueeze = expand.inputs[0].producer() if is_op(expand, "Expand") else None
    if not is_op(unsqueeze, "Unsqueeze"):
        return None
    axes = const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    kv, middle = unsqueeze.inputs[0], (unsqueeze.outputs[0], expand.outputs[0])
    shapes = [t.shape for t in (kv, *middle, value)]
    if (axes or attr_ints(unsqueeze, "axes")) not in ([2], [-3]) or any(s is None for s in shapes):
        return None
    if len(shapes[0]) != 4 or len(shapes[2]) != 5:
        return None
    (b, h, s, d), unsq, rep, out = (list(t) for t in shapes)
    if not (isinstance(h, int) and isinstance(n := rep[2], int)):
        return None
    # [B, H, S, D] -> [B, H, 1, S, D] -> [B, H, n, S, D] -> [B, H * n, S, D]: heads repeat in place
    for got, want in ((unsq, [b, h, 1, s, d]), (rep, [b, h, n, s, d]), (out, [b, h * n, s, d])):
        if len(got) != len(want) or not all(map(_same, got, want)):
            return None
    if any(len(t.uses()) != 1 for t in middle):
        return None
    operands = [*unsqueeze.inputs[1:], *expand.inputs[1:], *reshape.inputs[1:]]
    return kv, n, [unsqueeze, expand, reshape], operands


def _fuse(model: ir.Model, found: _Group) -> ir.Node:
    attrs = [
        ir.AttrFloat32("scale", found.scale),
        ir.AttrInt64("causal", 0),
        ir.AttrInt64("has_mask", int(found.roles.has("mask"))),
        ir.AttrInt64("nan_rows", int(found.nan_rows)),
    ]
    node = fuse_nodes(model, found.nodes, "attention", attrs)
    node.attributes["roles"] = found.roles.attribute(node)
    return node


def _same(a: object, b: object) -> bool:
    """Provably equal dims: equal ints, or symbolic dims of one (known) name."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and a.value is not None and a == b


def _scalar(value: ir.Value | None, other: ir.Value | None = None) -> float | None:
    """A float constant of one element (of rank at most ``other``'s, so it cannot broadcast)."""
    tensor = const_tensor(value)
    if tensor is None or tensor.size != 1 or tensor.dtype not in _FLOAT:
        return None
    if other is not None and (other.shape is None or len(tensor.shape) > len(other.shape)):
        return None
    return float(to_torch(tensor).reshape(()).item())
