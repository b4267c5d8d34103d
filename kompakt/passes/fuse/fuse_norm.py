"""fuse-norm: RMSNorm and LayerNorm over the last axis, with the residual add before them.

Exported from PyTorch, an RMSNorm is seven elementwise and reduction ops, each a full pass over
the activations; a LayerNormalization is one op but the residual ``Add`` before it is another pass.
Fused, the ``norm`` codegen family reads x (and the residual) once, keeps the row in registers,
and writes the normalized row and, when it is needed later, the sum (the next residual stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.fused import body_of, fuse_nodes
from kompakt.ir.tensors import to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.match import (
    Roles,
    const_scalar,
    const_tensor,
    is_op,
    other_input,
    same_shape,
    single_consumer,
)
from kompakt.passes.registry import register_pass

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)


@register_pass
@dataclass(frozen=True)
class FuseNorm(Pass):
    """Fuse RMSNorm / LayerNormalization over the last axis [and the residual Add before it].

    Before: s = Add(h, r)                                    # the residual stream, used later too
            y = Mul(w, Mul(s, Reciprocal(Sqrt(Add(ReduceMean(Pow(s, 2), [-1]), eps)))))
    After:  s, y = kompakt::FusedKernel[pattern="norm", kind="rms", eps=1e-6, has_residual=1,
                       roles=["x", "residual", "exponent", "axes", "eps", "weight"],
                       output_roles=["summed", "out"]](h, r, 2, [-1], eps, w)

    RMSNorm is matched as exported from Hugging Face Llama / Qwen2: the square is ``Pow(x, 2)`` or
    ``Mul(x, x)``, ReduceMean keeps dims over the last axis only, eps is a scalar constant, the
    inverse root is ``Reciprocal(Sqrt)`` or ``Div(1, Sqrt)`` times x, or ``Div(x, Sqrt)``; a Cast
    to fp32 before the norm and one back after it (fp16 models) join the group. LayerNorm is ONNX
    ``LayerNormalization`` over the last axis. Weight and bias must be constants of shape [D].
    A residual is an ``Add`` of two same-shape tensors producing x; when its sum is used elsewhere
    too, the fused node has two outputs (the roles say which is which). Every value inside the
    group has its consumers inside it, so the group stays convex.

    Args:
        residual: Also take the residual Add into the kernel.
    """

    name: ClassVar[str] = "fuse-norm"
    residual: bool = True

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        fused, kept = 0, []
        for node in list(graph):
            if node.graph is not graph or node.domain not in ("", "ai.onnx"):
                continue  # already taken into a group (its graph is now a body)
            if node.op_type == "ReduceMean":
                found = _match_rms(node, graph)
            elif node.op_type == "LayerNormalization":
                found = _match_layer(node, graph)
            else:
                continue
            if found is None:
                continue
            if isinstance(found, str):
                kept.append(f"{node.name}: {found}")
                continue
            if self.residual:
                _take_residual(found, graph)
            _fuse(model, found)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused, "kept": len(kept)}, notes=kept)


@dataclass
class _Match:
    kind: str
    eps: float
    x: ir.Value  # the kernel's input (before any Cast in the group)
    out: ir.Value
    nodes: list[ir.Node]
    roles: Roles = field(default_factory=Roles)
    summed: ir.Value | None = None


def _match_rms(reduce: ir.Node, graph: ir.Graph) -> _Match | str | None:
    """The RMSNorm around ``reduce``; None when it is no mean of squares (no note: other means)."""
    square = reduce.inputs[0].producer() if reduce.inputs and reduce.inputs[0] else None
    if is_op(square, "Mul") and square.inputs[0] is not square.inputs[1]:
        return None
    if not (is_op(square, "Pow") or is_op(square, "Mul")):
        return None
    if single_consumer(square.outputs[0], graph) is not reduce:
        return "the squares are read elsewhere too"
    xc = square.inputs[0]
    if square.op_type == "Pow" and (exponent := const_scalar(square.inputs[1])) != 2.0:
        return f"a mean of Pow(x, {exponent}), not of squares"
    if xc is None or xc.dtype not in _FLOAT or xc.shape is None or len(xc.shape) == 0:
        return "the normalized tensor is not a float tensor of known rank"
    rank = len(xc.shape)
    axes = _reduce_axes(reduce)
    if axes is None or [a % rank for a in axes] != [rank - 1]:
        return f"ReduceMean over axes {axes} (the kernel reduces the last axis only)"
    if _int_attr(reduce, "keepdims", 1) != 1:
        return "ReduceMean without keepdims"
    add = single_consumer(reduce.outputs[0], graph)
    eps_value = other_input(add, reduce.outputs[0]) if is_op(add, "Add") else None
    eps = const_scalar(eps_value)
    if eps is None:
        return "the mean of squares is not followed by Add(eps) with a scalar constant eps"
    sqrt = single_consumer(add.outputs[0], graph)
    if not is_op(sqrt, "Sqrt"):
        return "no Sqrt after Add(eps)"
    inv = single_consumer(sqrt.outputs[0], graph)
    nodes = [square, reduce, add, sqrt]
    if is_op(inv, "Div") and inv.inputs[0] is xc and inv.inputs[1] is sqrt.outputs[0]:
        normed = inv  # x / sqrt(...)
    else:
        one_over = is_op(inv, "Div") and inv.inputs[1] is sqrt.outputs[0]
        if not is_op(inv, "Reciprocal") and not (one_over and const_scalar(inv.inputs[0]) == 1.0):
            return "the root is not inverted (Reciprocal, Div(1, .), Div(x, .))"
        normed = single_consumer(inv.outputs[0], graph)
        if not is_op(normed, "Mul") or other_input(normed, inv.outputs[0]) is not xc:
            return "the inverse root does not multiply the normalized tensor"
        nodes.append(inv)
    nodes.append(normed)
    y = normed.outputs[0]
    cast_back = single_consumer(y, graph)
    if is_op(cast_back, "Cast"):  # fp16 models round the normalized value before the weight
        nodes.append(cast_back)
        y = cast_back.outputs[0]
    scale = single_consumer(y, graph)
    weight = other_input(scale, y) if is_op(scale, "Mul") else None
    d = xc.shape[-1]
    if weight is None or not _is_vector(weight, d):
        return f"the weight is not a constant [{d}] multiplying the normalized tensor"
    nodes.append(scale)
    found = _Match("rms", eps, xc, scale.outputs[0], nodes)
    _take_input_cast(found, graph, {id(square), id(normed)})
    found.roles.add(found.x, "x")
    if square.op_type == "Pow":
        found.roles.add(square.inputs[1], "exponent")
    if len(reduce.inputs) > 1 and reduce.inputs[1] is not None:
        found.roles.add(reduce.inputs[1], "axes")
    found.roles.add(eps_value, "eps")
    if normed is not inv and inv.op_type == "Div":
        found.roles.add(inv.inputs[0], "one")
    found.roles.add(weight, "weight")
    if found.x.dtype != found.out.dtype:
        return f"the norm reads {found.x.dtype.name} but writes {found.out.dtype.name}"
    return found


def _match_layer(node: ir.Node, graph: ir.Graph) -> _Match | str:
    x = node.inputs[0]
    if x is None or x.dtype not in _FLOAT or x.shape is None or len(x.shape) == 0:
        return "the normalized tensor is not a float tensor of known rank"
    rank = len(x.shape)
    axis = _int_attr(node, "axis", -1)
    if axis % rank != rank - 1:
        return f"LayerNormalization over axis {axis} (the kernel normalizes the last axis only)"
    if _int_attr(node, "stash_type", 1) != 1:
        return "LayerNormalization with statistics in low precision (the kernel keeps fp32)"
    if any(v.uses() or v in graph.outputs for v in node.outputs[1:]):
        return "the mean or inverse deviation output is used"
    d = x.shape[-1]
    weight = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    for what, value in (("weight", weight), ("bias", bias)):
        if value is not None and not _is_vector(value, d):
            return f"the {what} is not a constant [{d}]"
    eps = node.attributes.get("epsilon")
    found = _Match("layer", eps.as_float() if eps is not None else 1e-5, x, node.outputs[0], [node])
    found.roles.add(x, "x")
    found.roles.add(weight, "weight")
    if bias is not None:
        found.roles.add(bias, "bias")
    if x.dtype != found.out.dtype:
        return f"the norm reads {x.dtype.name} but writes {found.out.dtype.name}"
    return found


def _take_input_cast(found: _Match, graph: ir.Graph, readers: set[int]) -> None:
    """Takes ``x = Cast(x0, to=float)`` into the group when only the norm reads x and the norm
    writes x0's dtype (HF's fp16 RMSNorm: upcast, normalize in fp32, cast back, scale)."""
    cast = found.x.producer()
    if not is_op(cast, "Cast") or found.x in graph.outputs or cast.inputs[0] is None:
        return
    if {id(u.node) for u in found.x.uses()} != readers:
        return
    source = cast.inputs[0]
    if source.dtype in _FLOAT and source.dtype == found.out.dtype:
        found.nodes.insert(0, cast)
        found.x = source


def _take_residual(found: _Match, graph: ir.Graph) -> None:
    """Takes ``x = Add(a, b)`` (two same-shape non-constant tensors) into the group.

    Still convex: the group's other outside inputs are constants, so no path can leave the group
    through the sum and come back into it.
    """
    add = found.x.producer()
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return
    a, b = add.inputs
    if (
        a is None
        or b is None
        or a is b
        or const_tensor(a) is not None
        or const_tensor(b) is not None
    ):
        return
    if not (same_shape(a, found.x) and same_shape(b, found.x)):
        return  # a broadcast add (position embeddings): not a residual stream
    inside = {id(n) for n in found.nodes}
    if any(id(u.node) not in inside for u in found.x.uses()) or found.x in graph.outputs:
        found.summed = found.x  # the next block reads the sum: a second output
    del found.roles[id(found.x)]
    found.nodes.insert(0, add)
    found.x = a
    found.roles.add(a, "x")
    found.roles.add(b, "residual")


def _fuse(model: ir.Model, found: _Match) -> ir.Node:
    attrs = [
        ir.AttrString("kind", found.kind),
        ir.AttrFloat32("eps", found.eps),
        ir.AttrInt64("has_residual", int(found.roles.has("residual"))),
    ]
    node = fuse_nodes(model, found.nodes, "norm", attrs)
    node.attributes["roles"] = found.roles.attribute(node)
    # fuse_nodes orders outputs by their producers in the graph: the sum (if any) comes first.
    outputs = ["summed" if v is found.summed else "out" for v in body_of(node).outputs]
    node.attributes["output_roles"] = ir.AttrStrings("output_roles", outputs)
    return node


def _is_vector(value: ir.Value, d: object) -> bool:
    tensor = const_tensor(value)
    return (
        tensor is not None
        and isinstance(d, int)
        and tuple(tensor.shape) == (d,)
        and tensor.dtype in _FLOAT
    )


def _reduce_axes(reduce: ir.Node) -> list[int] | None:
    if len(reduce.inputs) > 1 and reduce.inputs[1] is not None:  # opset >= 18: an input
        tensor = const_tensor(reduce.inputs[1])
        return None if tensor is None else [int(a) for a in to_torch(tensor).reshape(-1)]
    attr = reduce.attributes.get("axes")  # opset < 18: an attribute
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    return node.attributes.get_int(name, default)
