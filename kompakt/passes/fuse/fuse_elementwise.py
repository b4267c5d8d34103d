"""fuse-elementwise: connected groups of elementwise ops become one generated pointwise kernel.

Run op by op, a chain of k elementwise ops reads and writes the whole tensor k times; these ops
are memory-bound, so the chain costs k times what one pass over the data does. Fused, the
``pointwise`` codegen family renders one Triton kernel per group that keeps every intermediate
in registers (see kompakt/codegen/pointwise/README.md).

A group must be something one flat kernel over one index space can compute: every node writes
the group's output shape S, and every value read from outside is ``full`` (shape S), a ``row``
(``[D]`` or ``[1, .., 1, D]`` for the last dim D of S) or a ``scalar`` (one element). Shapes are
compared dim by dim, symbolic dims by name; an unknown dim matches nothing, since a kernel
launched on a shape the pass could not prove would fail at run time instead of falling back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.codegen.pointwise.chain import POINTWISE_OPS
from kompakt.ir.fused import fuse_nodes, group_inputs, is_fused
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)
_CAST_TO = (_D.FLOAT, _D.FLOAT16)  # the targets the pointwise chain can store
# What `chain_from_graph` reads, less Constant: constants stay outside, so their values (scalar
# initializers and Constant outputs alike) become kernel arguments rather than body nodes.
OPS = frozenset(POINTWISE_OPS) - {"Constant"} | {"Identity"}


@register_pass
@dataclass(frozen=True)
class FuseElementwise(Pass):
    """Fuse connected groups of elementwise ops into one generated pointwise kernel each.

    Before: t = Add(mean: f32[b,s,1], eps: f32[])
            r = Reciprocal(Sqrt(t))
    After:  r = kompakt::FusedKernel[pattern="pointwise"](mean, eps)   # body: Add, Sqrt, Reciprocal

    Ops: those the pointwise family renders (Add Sub Mul Div Neg Abs Exp Log Sqrt Reciprocal Tanh
    Sigmoid Relu Erf Gelu Pow Min Max Where Cast Clip Identity) on float tensors; Where's
    condition may be bool. Constant, DequantizeLinear/QuantizeLinear and already fused nodes are
    never taken. A group stops growing where a node writes another shape, where an input would
    broadcast other than full / row / scalar, where its inputs would mix float dtypes, and where
    taking a node would close a cycle (a path leaving the group and coming back), which a single
    fused node cannot have. Needs shapes (run infer-shapes first): values without one are not
    fused.

    Args:
        min_nodes: The smallest group worth a kernel of its own.
    """

    name: ClassVar[str] = "fuse-elementwise"
    min_nodes: int = 2

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        notes: dict[int, str] = {}  # node id -> why it was left out, first reason only
        taken: set[int] = set()  # grown into some group (fused or too small), never reseeded
        fused: set[int] = set()
        groups = fused_nodes = 0
        seeds = [n for n in graph if _eligible(n, graph)]
        eligible = {id(n) for n in seeds}
        order = _positions(graph)
        for seed in seeds:
            if id(seed) in taken:
                continue
            problem = _broadcast_problem(seed)
            if problem is not None:
                if any(id(n) in eligible for n in _neighbours(seed, graph)):
                    notes.setdefault(id(seed), f"{_label(seed)}: not fused: {problem}")
                continue
            group, refused = _grow(seed, graph, order, eligible, taken)
            taken.update(id(n) for n in group)
            for node, reason in refused:
                note = f"{_label(node)}: left out of the group of {_label(seed)}: {reason}"
                notes.setdefault(id(node), note)
            if len(group) < self.min_nodes:
                if len(group) > 1:
                    notes[id(seed)] = (
                        f"{_label(seed)}: a group of {len(group)} nodes is below min-nodes="
                        f"{self.min_nodes}"
                    )
                continue
            if not _escaping(group, graph):
                continue  # nothing outside reads it: dead code, left to remove-dead-code
            fuse_nodes(model, group, "pointwise")
            order = _positions(graph)  # fusing re-sorts the graph
            groups += 1
            fused_nodes += len(group)
            fused.update(id(n) for n in group)
        for node_id in fused:
            notes.pop(node_id, None)  # refused by one group, fused in another
        return PassResult(
            changed=groups > 0,
            stats={"groups": groups, "nodes": fused_nodes, "refused": len(notes)},
            notes=list(notes.values()),
        )


def _eligible(node: ir.Node, graph: ir.Graph) -> bool:
    """Could this node be part of some pointwise group (shape aside)?"""
    if is_fused(node) or node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
        return False
    if len(node.outputs) != 1:
        return False
    out = node.outputs[0]
    if out.dtype not in _FLOAT or out.shape is None:
        return False
    if any(user.graph is not graph for user, _ in out.uses()):
        return False  # read inside a subgraph: the reachability check below cannot see it
    if node.op_type == "Cast" and _D(node.attributes.get_int("to", 0)) not in _CAST_TO:
        return False
    if node.op_type == "Gelu" and node.attributes.get_string("approximate", "none") not in (
        "none",
        "tanh",
    ):
        return False
    for position, value in enumerate(node.inputs):
        if value is None:
            if node.op_type == "Clip":
                continue  # an absent bound
            return False
        condition = node.op_type == "Where" and position == 0
        allowed = (_D.BOOL,) if condition else _FLOAT
        if value.dtype not in allowed:
            return False
    return True


def _broadcast_problem(node: ir.Node) -> str | None:
    """Why the node's inputs cannot be indexed by a flat kernel over its output, or None."""
    out = node.outputs[0].shape
    if any(_unknown(d) for d in out):
        return f"its output shape {_text(out)} has an unknown dim"
    for value in node.inputs:
        if value is None or role(value, out) is not None:
            continue
        if value.shape is None or any(_unknown(d) for d in value.shape):
            return f"input '{value.name}' {_text(value.shape)} has an unknown dim: no proven role"
        row = _text_dim(out[-1]) if len(out) else "1"
        return (
            f"input '{value.name}' {_text(value.shape)} broadcasts against the output "
            f"{_text(out)} in a way the kernel cannot index (it reads the output's shape, a row "
            f"[{row}] or one element)"
        )
    return None


def role(value: ir.Value, out: ir.Shape) -> str | None:
    """'full', 'row' or 'scalar': how ``value`` broadcasts against the shape ``out``; None if
    the pointwise kernel cannot index it (also when a dim is unknown)."""
    if value.shape is None:
        return None
    dims, target = list(value.shape), list(out)
    if len(dims) == len(target) and all(_same_dim(a, b) for a, b in zip(dims, target, strict=True)):
        return "full"
    if all(isinstance(d, int) and d == 1 for d in dims):
        return "scalar"
    if (
        dims
        and target
        and len(dims) <= len(target)
        and all(isinstance(d, int) and d == 1 for d in dims[:-1])
        and _same_dim(dims[-1], target[-1])
    ):
        return "row"
    return None


def _grow(seed, graph, order, eligible, taken):
    """The largest group around ``seed`` the rules allow (greedy, in graph order), and the
    eligible neighbours it refused with the reason."""
    shape = seed.outputs[0].shape
    members: dict[int, ir.Node] = {id(seed): seed}
    refused: dict[int, tuple[ir.Node, str]] = {}
    changed = True
    while changed:  # a neighbour refused for a cycle may fit once the path joined the group
        changed = False
        frontier = {
            id(n): n
            for m in members.values()
            for n in _neighbours(m, graph)
            if id(n) in eligible and id(n) not in members and id(n) not in taken
        }
        for node in sorted(frontier.values(), key=lambda n: order[id(n)]):
            if not _same_shape(node.outputs[0].shape, shape):
                continue  # another index space: a group of its own, not a refusal
            reason = _broadcast_problem(node) or _join_problem(node, members, order)
            if reason is not None:
                refused[id(node)] = (node, reason)
                continue
            members[id(node)] = node
            refused.pop(id(node), None)
            changed = True
    group = sorted(members.values(), key=lambda n: order[id(n)])
    return group, [r for key, r in refused.items() if key not in members]


def _join_problem(node, members, order) -> str | None:
    through = _path_between(node, members, order)
    if through is not None:
        return (
            f"taking it would close a cycle through '{through.name}' ({through.op_type}), "
            "which runs between it and the group"
        )
    return _dtype_problem([*members.values(), node], order)


def _path_between(node, members, order) -> ir.Node | None:
    """An outside node on a path group -> outside -> node or node -> outside -> group, if any.

    Nodes are visited in topological order bounds: a path into ``node`` cannot pass a node
    after it, and a path into the group cannot pass the group's last node.
    """
    last = max(order[id(m)] for m in members.values())
    starts = [u for m in members.values() for u in _users(m) if id(u) not in members]
    hit = _reaches(starts, {id(node)}, order[id(node)], order, skip={id(node)})
    if hit is not None:
        return hit
    starts = [u for u in _users(node) if id(u) not in members]
    return _reaches(starts, set(members), last, order, skip=set())


def _reaches(starts, targets, bound, order, skip) -> ir.Node | None:
    """The start node from which a consumer path reaches ``targets`` (by id), or None."""
    seen: set[int] = set()  # shared: what one start reached without a hit, another will too
    for start in starts:
        if id(start) in skip:
            continue
        todo = [start]
        while todo:
            node = todo.pop()
            if id(node) in seen or order.get(id(node), bound + 1) > bound:
                continue
            seen.add(id(node))
            for user in _users(node):
                if id(user) in targets:
                    return start
                todo.append(user)
    return None


def _dtype_problem(nodes, order) -> str | None:
    """The kernel reads every non-scalar input in one dtype: the first float input's (in the
    order fuse_nodes gives the fused node's inputs); scalars are widened, so any float works."""
    shape = nodes[0].outputs[0].shape
    first = None
    for value in group_inputs(sorted(nodes, key=lambda n: order[id(n)])):
        if value.dtype == _D.BOOL:
            continue  # a Where condition
        if first is None:
            first = value
        elif value.dtype != first.dtype and role(value, shape) != "scalar":
            return (
                f"input '{value.name}' is {value.dtype.name} but '{first.name}' is "
                f"{first.dtype.name}: one kernel reads one dtype"
            )
    return None


def _escaping(group, graph) -> bool:
    inside, outputs = {id(n) for n in group}, {id(v) for v in graph.outputs}
    return any(
        id(v) in outputs or any(id(u) not in inside for u, _ in v.uses())
        for n in group
        for v in n.outputs
    )


def _neighbours(node: ir.Node, graph: ir.Graph) -> list[ir.Node]:
    producers = [v.producer() for v in node.inputs if v is not None]
    return [p for p in producers if p is not None and p.graph is graph] + list(_users(node))


def _users(node: ir.Node) -> list[ir.Node]:
    return [user for value in node.outputs for user, _ in value.uses()]


def _positions(graph: ir.Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(graph)}


def _unknown(dim) -> bool:
    return not isinstance(dim, int) and dim.value is None


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value


def _same_shape(a: ir.Shape | None, b: ir.Shape) -> bool:
    return (
        a is not None
        and len(a) == len(b)
        and all(_same_dim(x, y) for x, y in zip(a, b, strict=True))
    )


def _text_dim(dim) -> str:
    return str(dim) if isinstance(dim, int) else str(dim.value or "?")


def _text(shape: ir.Shape | None) -> str:
    return "[?]" if shape is None else "[" + ",".join(_text_dim(d) for d in shape) + "]"


def _label(node: ir.Node) -> str:
    return f"'{node.name}' ({node.op_type})"
