"""fuse-rotary: rotary position embedding, ``x * cos + rotate_half(x) * sin``, as one kernel.

Exported, Hugging Face's ``apply_rotary_pos_emb`` is seven ops per tensor (two Slices, a Neg and a
Concat for ``rotate_half``, two Muls and an Add), five of them full passes over q or k; partial
rotary (GPT-NeoX, Phi) adds a Slice on each side and a Concat of the pass-through features. Fused,
the ``rotary`` codegen family reads x once and the cos/sin tile once per group of heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.fused import body_of, fuse_nodes
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.kv_append import CacheWrites, find_cache_writes
from kompakt.passes.fuse.match import (
    Roles,
    const_ints,
    is_op,
    other_input,
    same_dim,
    same_shape,
    single_consumer,
)
from kompakt.passes.registry import register_pass

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)


@register_pass
@dataclass(frozen=True)
class FuseRotary(Pass):
    """Fuse rotary position embedding ``x * cos + rotate_half(x) * sin`` (HF's convention).

    Before: x1 = Slice(x, [0], [h], [3], [1]);  x2 = Slice(x, [h], [big], [3], [1])
            y = Add(Mul(x, cos), Mul(Concat(Neg(x2), x1, axis=-1), sin))  # cos: [1, 1, S, 2h]
    After:  y = kompakt::FusedKernel[pattern="rotary", rotary_dim=2h, roles=["x", "cos",
                    "bound", "bound", "bound", "bound", "bound", "sin"]](x, cos, 0, h, 3, 1, big, sin)

    Matched from each Neg: rotate_half must be ``Concat(-x2, x1)`` over the last axis, where the
    Slices of x have constant bounds proven, with x's inferred last dim R, to be exactly
    ``[R/2:R]`` and ``[0:R/2]`` (axis -1 or rank - 1, step 1); Mul and Add operands may come in
    either order. Partial rotary (``x_rot = x[..., :R]``, ``x_pass = x[..., R:]``,
    ``Concat(y, x_pass)``) joins the group when every value inside it is read only there; x is
    then the whole [B, H, S, D] tensor. q and k make separate groups.

    Only what the kernel takes is fused: x [B, H, S, D] in fp16/bf16/fp32, cos and sin of one
    shape [S, R], [1, S, R] or [B or 1, 1, S, R] (dims proven equal to x's, static R), the
    output of x's shape. cos/sin stay outside the group (Llama's Unsqueezed tables feed every
    layer's q and k). The kernel computes in fp32 and rounds once where the body rounds after
    each op (fp16 models): equal to the body up to that rounding.

    With ``pair`` (the default), two groups that read the same cos and sin (a layer's q and k)
    with the same rotary dim, batch, positions and head size become one fused node with two
    outputs, which the kernel rotates in one launch: roles ``x`` and ``x2``, outputs in that
    order.

    With ``append_kv`` (the default) a pair whose k result is written into a static KV cache,
    beside v (what a captured ``index_copy`` of kompakt.lowering.kv_cache exports, per cache)::

        present = Transpose(ScatterND(Transpose(past, P), positions, Transpose(k_rot, P)), P^-1)

    takes both cache writes into the node (P moves the sequence axis first and keeps the
    features last; v's write has the same P and positions and comes from the same module:
    kv_append.py): outputs ``x``'s rotation
    and the two updated caches (``output_roles``: ``x``, ``k_cache``, ``v_cache``), input roles
    ``k_cache``, ``v_cache``, ``positions`` ([S, 1]) and ``v``. One launch then rotates q,
    rotates k into its cache rows and copies v into its own; a run that donates the caches
    (kompakt.runtime.in_place) has them written in place.

    Args:
        pair: Fuse q's and k's rotations into one node (one launch).
        append_kv: Take a pair's KV-cache writes into that node (needs ``pair``).
    """

    name: ClassVar[str] = "fuse-rotary"
    pair: bool = True
    append_kv: bool = True

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        groups, kept, taken = [], [], set()
        for node in list(graph):
            if not is_op(node, "Neg") or id(node) in taken:
                continue
            found = _match(node, graph)
            if found is None:
                continue  # a Neg that is no rotate_half
            if isinstance(found, str):
                kept.append(f"{node.name}: {found}")
                continue
            groups.append(found)
            taken.update(id(n) for n in found.nodes)
        order = {id(n): i for i, n in enumerate(graph)}
        units = _pairs(groups, order) if self.pair else [[g] for g in groups]
        launches = appended = 0
        for unit in units:
            # Earlier fusions add paths (a fused node's outputs depend on all its inputs): a pair
            # that one node could hold before may no longer be convex.
            position = {id(n): i for i, n in enumerate(graph)}
            if len(unit) == 2 and _depends(unit, position):
                for group in unit:
                    _fuse(model, [group])
                launches += 2
            else:
                append = _cache_writes(unit, graph, position) if self.append_kv else None
                _fuse(model, unit, append)
                launches += 1
                appended += append is not None
        stats = {"fused": len(groups), "kept": len(kept), "launches": launches}
        if appended:
            stats["kv_appended"] = appended
        return PassResult(changed=bool(groups), stats=stats, notes=kept)


@dataclass
class _Group:
    nodes: list[ir.Node]
    x: ir.Value
    rotary_dim: int
    cos: ir.Value
    sin: ir.Value
    roles: Roles = field(default_factory=Roles)


def _match(neg: ir.Node, graph: ir.Graph) -> _Group | str | None:
    """The rotary group around ``neg``; None when it is no rotate_half (no note)."""
    neg_slice = neg.inputs[0].producer() if neg.inputs and neg.inputs[0] is not None else None
    cat = single_consumer(neg.outputs[0], graph)
    if not is_op(neg_slice, "Slice") or not is_op(cat, "Concat") or len(cat.inputs) != 2:
        return None
    plain = other_input(cat, neg.outputs[0])
    plain_slice = plain.producer() if plain is not None else None
    if not is_op(plain_slice, "Slice") or plain_slice.inputs[0] is not neg_slice.inputs[0]:
        return None
    # Concat(+-Slice(v), Slice(v)): a rotate_half, right or wrong; from here on say why not.
    xr = neg_slice.inputs[0]
    if xr is None or xr.shape is None or len(xr.shape) != 4 or not isinstance(xr.shape[3], int):
        return "rotate_half of a tensor that is not 4-D with a static last dim"
    if xr.dtype not in _FLOAT:
        return f"rotate_half of a {xr.dtype} tensor (the kernel takes fp16/bf16/fp32)"
    r = xr.shape[3]
    if cat.attributes.get_int("axis", 0) % 4 != 3:
        return "rotate_half concatenates along another axis than the last"
    if cat.inputs[0] is not neg.outputs[0]:
        return "the Neg is on the Concat's second operand (rotate_half is cat(-x2, x1))"
    half = r // 2
    lo, hi = _slice_range(plain_slice, r), _slice_range(neg_slice, r)
    if lo is None or hi is None:
        return "a rotate_half Slice has non-constant bounds, a step, or another axis than the last"
    if r % 2 or lo != (0, half) or hi != (half, r):
        return (
            f"rotate_half slices [{lo[0]}:{lo[1]}] and -[{hi[0]}:{hi[1]}] are not the halves "
            f"[0:{half}] and -[{half}:{r}] of {r} features"
        )
    if single_consumer(plain, graph) is not cat or single_consumer(neg.inputs[0], graph) is not neg:
        return "a half of x is read outside rotate_half too"
    mul_sin = single_consumer(cat.outputs[0], graph)
    sin = other_input(mul_sin, cat.outputs[0]) if is_op(mul_sin, "Mul") else None
    add = single_consumer(mul_sin.outputs[0], graph) if sin is not None else None
    if not is_op(add, "Add"):
        return "rotate_half(x) is not multiplied by sin and added (read by one Mul, then one Add)"
    cos_term = other_input(add, mul_sin.outputs[0])
    mul_cos = cos_term.producer() if cos_term is not None else None
    cos = other_input(mul_cos, xr) if is_op(mul_cos, "Mul") else None
    if cos is None or single_consumer(cos_term, graph) is not add:
        return "the other term of the Add is not Mul(x, cos) read by that Add only"
    reason = _check_tables(xr, cos, sin, add.outputs[0])
    if reason:
        return reason
    group = _Group([neg_slice, plain_slice, neg, cat, mul_sin, mul_cos, add], xr, r, cos, sin)
    for s in (neg_slice, plain_slice):
        for value in s.inputs[1:]:
            group.roles.add(value, "bound")
    group.roles.add(cos, "cos")
    group.roles.add(sin, "sin")
    _take_partial(group, add, graph)
    group.roles.add(group.x, "x")
    return group


def _check_tables(xr: ir.Value, cos: ir.Value, sin: ir.Value, out: ir.Value) -> str | None:
    """cos and sin as the kernel reads them: one shape [S, R], [1, S, R] or [B|1, 1, S, R]."""
    if not same_shape(out, xr):
        return f"cos/sin broadcast x {_dims(xr.shape)} to {_dims(out.shape)}"
    if not same_shape(cos, sin):
        return f"cos {_dims(cos.shape)} and sin {_dims(sin.shape)} differ in shape"
    b, _, s, r = xr.shape
    dims = list(cos.shape)  # known: same_shape(cos, sin) holds only for known shapes
    # ONNX broadcasts from the right: a 3-D table's first dim meets x's heads, so only a 1 there
    # means "every batch row" as the kernel reads it; a 4-D table's first dim meets the batch.
    ok = len(dims) in (2, 3, 4) and dims[-1] == r and same_dim(dims[-2], s)
    if len(dims) == 3:
        ok = ok and dims[0] == 1
    elif len(dims) == 4:
        ok = ok and dims[1] == 1 and (dims[0] == 1 or same_dim(dims[0], b))
    if not ok:
        return (
            f"cos/sin {_dims(cos.shape)} are not [S, R], [1, S, R] or [B or 1, 1, S, R] of x "
            f"{_dims(xr.shape)} (S, R and B proven equal)"
        )
    return None


def _take_partial(group: _Group, add: ir.Node, graph: ir.Graph) -> None:
    """Widens the group to partial rotary: x_rot = Slice(x, :R), y = Concat(rot(x_rot),
    Slice(x, R:)) on the last axis, when only the group reads x_rot and the rotated part."""
    xr = group.x
    rot_slice = xr.producer()
    out_cat = single_consumer(add.outputs[0], graph)
    if not is_op(rot_slice, "Slice") or not is_op(out_cat, "Concat") or len(out_cat.inputs) != 2:
        return
    x = rot_slice.inputs[0]
    if x is None or x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
        return
    d, r = x.shape[3], group.rotary_dim
    if _slice_range(rot_slice, d) != (0, r) or out_cat.inputs[0] is not add.outputs[0]:
        return
    rest = out_cat.inputs[1]
    pass_slice = rest.producer() if rest is not None else None
    if not is_op(pass_slice, "Slice") or pass_slice.inputs[0] is not x:
        return
    if _slice_range(pass_slice, d) != (r, d) or single_consumer(rest, graph) is not out_cat:
        return
    if out_cat.attributes.get_int("axis", 0) % 4 != 3 or not same_shape(out_cat.outputs[0], x):
        return
    inside = {id(n) for n in group.nodes}
    if xr in graph.outputs or any(id(u.node) not in inside for u in xr.uses()):
        return  # x_rot is read elsewhere too: the group stays the rotation of x_rot
    group.nodes[:0] = [rot_slice, pass_slice]
    group.nodes.append(out_cat)
    for s in (rot_slice, pass_slice):
        for value in s.inputs[1:]:
            group.roles.add(value, "bound")
    group.x = x


def _slice_range(node: ir.Node, dim: int) -> tuple[int, int] | None:
    """(start, stop) of a Slice of the last axis of a rank-4 tensor whose last dim is ``dim``,
    clamped as ONNX clamps; None unless the bounds are constants, one axis, step 1."""
    if len(node.inputs) >= 3:  # opset >= 10: bounds are inputs (axes, steps optional)
        operands = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
        bounds = [None if v is None else const_ints(v) for v in operands]
        if any(v is not None and b is None for v, b in zip(operands, bounds, strict=True)):
            return None  # a bound computed at run time
        starts, ends, axes, steps = bounds
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if (axes if axes is not None else [0]) not in ([3], [-1]) or steps not in (None, [1]):
        return None
    start, stop, _ = slice(starts[0], ends[0]).indices(dim)  # clamps like ONNX for step 1
    return start, max(start, stop)


def _dims(shape: ir.Shape | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _pairs(groups: list[_Group], position: dict[int, int]) -> list[list[_Group]]:
    """Groups in units of one launch: each group with the first earlier, still single group that
    can share its launch (same tables, rotary dim, and x of one batch, positions and head size;
    neither computed from the other)."""
    units: list[list[_Group]] = []
    waiting: list[_Group] = []
    for group in groups:
        mate = next((w for w in waiting if _can_pair(w, group, position)), None)
        if mate is None:
            waiting.append(group)
            continue
        waiting.remove(mate)
        units.append([mate, group])
    units.extend([w] for w in waiting)
    return units


def _depends(unit: list[_Group], position: dict[int, int]) -> bool:
    """Whether one group of a pair reads what the other computes, in the graph as it is now."""
    a, b = unit
    return _reaches(a, b.x, position) or _reaches(b, a.x, position)


def _reaches(group: _Group, value: ir.Value, position: dict[int, int]) -> bool:
    """Whether ``value`` is computed from the group's nodes; ``position`` is each node's place
    in the (sorted) graph, so the walk back stops at nodes placed before the group's first."""
    inside = {id(n) for n in group.nodes}
    first = min(position[key] for key in inside)
    todo, seen = [value.producer()], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen or position.get(id(node), -1) < first:
            continue
        if id(node) in inside:
            return True
        seen.add(id(node))
        todo.extend(v.producer() for v in node.inputs if v is not None)
    return False


def _can_pair(a: _Group, b: _Group, position: dict[int, int]) -> bool:
    if _depends([a, b], position):
        return False  # one rotates what the other produced: no single node can hold both
    if a.cos is not b.cos or a.sin is not b.sin or a.rotary_dim != b.rotary_dim:
        return False
    xa, xb = list(a.x.shape), list(b.x.shape)
    return (
        a.x.dtype == b.x.dtype
        and same_dim(xa[0], xb[0])
        and same_dim(xa[2], xb[2])
        and xa[3] == xb[3]
    )


@dataclass
class _Append:
    """A pair's q and k groups, and the cache writes k's group takes in."""

    q: _Group
    k: _Group
    writes: CacheWrites


def _cache_writes(unit: list[_Group], graph: ir.Graph, position: dict[int, int]) -> _Append | None:
    """The KV-cache writes a q/k pair can take in (kv_append.py), with which group is k."""
    if len(unit) != 2:
        return None
    for q, k in (unit, unit[::-1]):

        def from_pair(value: ir.Value, nodes: list[ir.Node], q=q, k=k) -> bool:
            pseudo = _Group(q.nodes + k.nodes + nodes, q.x, 0, q.cos, q.sin)
            return _reaches(pseudo, value, position)

        q_result, k_result = q.nodes[-1].outputs[0], k.nodes[-1].outputs[0]
        if find_cache_writes(q_result, q.x, graph, from_pair) is not None:
            continue  # q's result written to a cache too: not the q/k of one attention
        writes = find_cache_writes(k_result, k.x, graph, from_pair)
        if writes is not None:
            return _Append(q, k, writes)
    return None


def _fuse(model: ir.Model, unit: list[_Group], append: _Append | None = None) -> ir.Node:
    finals = [group.nodes[-1].outputs[0] for group in unit]  # each group's one result
    nodes = [n for group in unit for n in group.nodes]
    attributes = [ir.AttrInt64("rotary_dim", unit[0].rotary_dim)]
    if append is not None:  # k's result is no output: it goes into its cache
        writes = append.writes
        nodes += writes.nodes
        attributes.append(ir.AttrInt64s("cache_perm", writes.perm))
        attributes.append(ir.AttrInt64s("v_perm", writes.v_perm))
    node = fuse_nodes(model, nodes, "rotary", attributes)
    roles = Roles()
    if append is not None:
        named = {id(writes.k_present): "k_cache", id(writes.v_present): "v_cache"}
        out_roles = [named.get(id(v), "x") for v in body_of(node).outputs]
        node.attributes["output_roles"] = ir.AttrStrings("output_roles", out_roles)
        roles.merge(append.q.roles)
        roles.merge(append.k.roles, {"x": "x2"})
        for value, role in zip(writes.inputs(), CacheWrites.ROLES, strict=True):
            roles.add(value, role)
        node.attributes["roles"] = roles.attribute(node)
        return node
    # The fused node's outputs come in graph order; x is the group whose result is output 0.
    outputs = body_of(node).outputs
    for i, value in enumerate(outputs):
        group = unit[next(j for j, final in enumerate(finals) if final is value)]
        roles.merge(group.roles, {"x": "x2"} if i else None)
    node.attributes["roles"] = roles.attribute(node)
    return node
