"""fuse-quantized-matmul: a W8A8 (int8) or fp8 MatMul, both of whose inputs are dequantized.

quantize-activations and fp8 write a quantized layer as fake quantization: the activation goes
through QuantizeLinear -> DequantizeLinear (a calibrated constant scale, or one computed per token
in the graph), the weight through DequantizeLinear, and a float MatMul multiplies the two. Run op
by op, both operands are materialized in float on every call. Fused, the ``scaled_matmul`` codegen
binder multiplies the one-byte codes on int8 / fp8 tensor cores (exact int32 or fp32 sums) and
applies both scales once per output, in the epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.builder import unique_name
from kompakt.ir.fused import fuse_nodes
from kompakt.ir.metadata import module_of, set_module
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.match import (
    Roles,
    const_scalar,
    const_tensor,
    is_op,
    other_input,
    single_consumer,
)
from kompakt.passes.registry import register_pass

_D = ir.DataType
_KINDS = {_D.INT8: "int8", _D.FLOAT8E4M3FN: "fp8"}
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)
_SYMMETRIC_W8 = "quantize-weights{bits=8,group-size=-1,symmetric=true}"


@register_pass
@dataclass(frozen=True)
class FuseQuantizedMatMul(Pass):
    """Fuse [activation quantization ->] DQ(x_q), DQ(W_q) -> MatMul [-> Add bias] (W8A8, fp8).

    Before: s  = Max(Div(ReduceMax(Abs(x), [-1]), 127), tiny)    # dynamic; static: a constant
            xq = QuantizeLinear(x, s, axis=-1, block_size=K)      # int8 or float8e4m3fn
            y  = Add(MatMul(DequantizeLinear(xq, s, axis=-1, block_size=K),
                            DequantizeLinear(Wq: i8[K, N], s_w: f32[N], axis=1)), b)
    After:  y  = kompakt::FusedKernel[pattern="scaled_matmul", kind="int8",
                     act_scale="per_token", act_quantize=1, has_bias=1,
                     roles=["x", "act_axes", "act_qmax", "act_floor", "wq", "w_scale", "bias"]]
                     (x, [-1], 127, tiny, Wq, s_w, b)

    ``kind`` is "int8" (int8 codes on both sides) or "fp8" (float8e4m3fn on both). ``act_scale``
    is "static" (a constant per-tensor scale), "per_token" (one scale per row, computed at run
    time) or "per_tensor_dynamic" (one, computed at run time). Weights must be int8 / fp8
    constants with one scale per output column or per tensor (a single group along K counts).

    The activation's quantization joins the group (``act_quantize=1``, role ``x``) when it serves
    this MatMul only: static quantize-activations gives each MatMul its own Q/DQ pair, and a
    dynamic input read by one MatMul (o_proj, down_proj) has its scale computation
    (Abs -> ReduceMax -> Div -> Max, every value used only inside) taken in too. When one
    quantized activation feeds several MatMuls (q/k/v and gate/up share one Q/DQ in dynamic
    quantize-activations and in fp8), its QuantizeLinear and scale stay outside and run once;
    each MatMul gets its own copy of the activation's DequantizeLinear and its group takes the
    codes and the scale (``act_quantize=0``, roles ``xq`` / ``act_scale``). The copies compute
    bit for bit what the shared DequantizeLinear did, every value inside a group is used only
    inside it (the group is convex), and nothing is quantized twice. Taking the shared
    quantization into one group would make its codes a second output read by the others; that
    is left for later.

    Groups the kernels can never run are left alone with a note (uint8 / int4 weights, groups
    along K, mixed int8 / fp8 operands, per-channel activation scales). A non-zero zero point is
    fused (the body stays exact) and refused by the binder, so it runs through torch.
    """

    name: ClassVar[str] = "fuse-quantized-matmul"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        fused, kept, copies = 0, [], 0
        shared: dict[int, ir.Node] = {}
        # Decided up front: once q and k have their copies, v is the shared node's last reader.
        many = {
            id(n) for n in graph if any(len(v.uses()) > 1 or v in graph.outputs for v in n.outputs)
        }
        for matmul in [n for n in graph if is_op(n, "MatMul") and len(n.inputs) == 2]:
            found = _match(graph, matmul, many)
            if found is None:
                continue
            if isinstance(found, str):
                label = module_of(matmul) or matmul.name or matmul.outputs[0].name
                kept.append(f"{label}: {found}")
                continue
            if found.share is not None:
                shared[id(found.share)] = found.share
                found.nodes[0] = _own_copy(graph, found.share, matmul)
                copies += 1
            node = fuse_nodes(model, found.nodes, "scaled_matmul", found.attributes())
            node.attributes["roles"] = found.roles.attribute(node)
            fused += 1
        for dq in shared.values():  # every reader got its own copy: the shared one is dead
            if not dq.outputs[0].uses() and dq.outputs[0] not in graph.outputs:
                graph.remove(dq, safe=True)
        stats = {"fused": fused, "kept": len(kept), "activation_dq_copies": copies}
        return PassResult(changed=fused > 0, stats=stats, notes=kept)


@dataclass
class _Found:
    nodes: list[ir.Node]  # [activation DQ, weight DQ, MatMul, (Add), (quantization nodes)]
    kind: str
    act_scale: str
    quantize: bool
    share: ir.Node | None  # the shared activation DQ this MatMul gets a copy of
    has_bias: bool = False
    roles: Roles = field(default_factory=Roles)

    def attributes(self) -> list[ir.Attr]:
        return [
            ir.AttrString("kind", self.kind),
            ir.AttrString("act_scale", self.act_scale),
            ir.AttrInt64("act_quantize", int(self.quantize)),
            ir.AttrInt64("has_bias", int(self.has_bias)),
        ]


def _match(graph: ir.Graph, matmul: ir.Node, many: set[int]) -> _Found | str | None:
    """The group around ``matmul``; a reason when it cannot be one; None when not ours."""
    a, w = matmul.inputs
    dq_x = a.producer() if a is not None else None
    dq_w = w.producer() if w is not None else None
    if not (is_op(dq_x, "DequantizeLinear") and is_op(dq_w, "DequantizeLinear")):
        return None  # a float operand: weight-only layers are fuse-dequant-matmul's
    if dq_w.inputs[0] is None or dq_w.inputs[0].const_value is None:
        return None  # activation x activation (quantized attention scores): no weight
    reason = _weight_problem(graph, dq_w, matmul)
    if reason:
        return reason
    k, n = dq_w.inputs[0].const_value.shape
    xq, s = dq_x.inputs[0], dq_x.inputs[1]
    if xq is None or xq.dtype is None:
        return "the activation codes' type is unknown (run infer-shapes first)"
    if xq.dtype != dq_w.inputs[0].dtype:
        return f"{xq.dtype.name} activations with {dq_w.inputs[0].dtype.name} weights"
    if a.dtype not in _FLOAT:
        return "the dequantized activation is not fp16, bf16 or fp32"
    x_zero = _input(dq_x, 2)
    if x_zero is not None and const_tensor(x_zero) is None:
        return "the activation zero point is not a constant"
    per_token, reason = _activation_granularity(dq_x, int(k))
    if reason:
        return reason
    static = const_tensor(s) is not None
    if static and per_token:
        return "a constant activation scale per token"
    act_scale = "static" if static else "per_token" if per_token else "per_tensor_dynamic"
    share = dq_x if id(dq_x) in many else None
    quantization = None if share else _quantization(graph, dq_x)
    found = _Found([dq_x, dq_w, matmul], _KINDS[xq.dtype], act_scale, bool(quantization), share)
    found.roles.add(dq_w.inputs[0], "wq")
    found.roles.add(dq_w.inputs[1], "w_scale")
    found.roles.add(_input(dq_w, 2), "w_zero")
    if quantization is None:
        found.roles.add(xq, "xq")
        found.roles.add(s, "act_scale")
        found.roles.add(x_zero, "act_zero")
    else:
        q, chain = quantization
        found.nodes += [q, *chain]
        found.roles.add(q.inputs[0], "x")
        found.roles.add(x_zero, "act_zero")
        if chain:
            red, div, mx = chain[1], chain[2], chain[3]
            found.roles.add(_input(red, 1), "act_axes")
            found.roles.add(div.inputs[1], "act_qmax")
            found.roles.add(other_input(mx, div.outputs[0]), "act_floor")
        else:
            found.roles.add(s, "act_scale")
    add = single_consumer(matmul.outputs[0], graph)
    bias = other_input(add, matmul.outputs[0]) if is_op(add, "Add") else None
    tensor = const_tensor(bias)
    if tensor is not None and list(tensor.shape) == [n]:
        found.nodes.append(add)
        found.roles.add(bias, "bias")
        found.has_bias = True
    return found


def _weight_problem(graph: ir.Graph, dq: ir.Node, matmul: ir.Node) -> str | None:
    q, scale, zero = dq.inputs[0], dq.inputs[1], _input(dq, 2)
    if q.dtype not in _KINDS:
        hint = f"; {_SYMMETRIC_W8} writes int8" if q.dtype == _D.UINT8 else ""
        return f"{q.dtype.name} weights (the kernels multiply int8 or float8e4m3fn codes{hint})"
    shape = list(q.const_value.shape)
    if len(shape) != 2:
        return "the weight is not 2-D"
    s = const_tensor(scale)
    if s is None:
        return "the weight scale is not a constant"
    if zero is not None and const_tensor(zero) is None:
        return "the weight zero point is not a constant"
    if single_consumer(dq.outputs[0], graph) is not matmul:
        return "the dequantized weight has other consumers"
    k, n = shape
    if s.size == 1:
        return None  # per tensor
    axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
    if block:
        if axis in (0, -2) and block >= k and list(s.shape) == [1, n]:
            return None  # one group spanning K: one scale per column
        return f"groups of {block} rows along K (the kernels take one scale per column)"
    if axis in (1, -1) and list(s.shape) == [n]:
        return None
    return "weight scales per row of K (the kernels take one per column)"


def _activation_granularity(dq: ir.Node, k: int) -> tuple[bool, str | None]:
    """(per token rather than per tensor, why neither)."""
    scale = dq.inputs[1]
    tensor = const_tensor(scale)
    dims = list(tensor.shape) if tensor is not None else None
    if dims is None and scale.shape is not None:
        dims = list(scale.shape)
    axis, block = _attr(dq, "axis", 1), _attr(dq, "block_size", 0)
    if block:
        rank = len(dq.inputs[0].shape) if dq.inputs[0].shape is not None else 0
        if axis in (-1, rank - 1) and block == k and dims is not None and dims[-1:] == [1]:
            return True, None
        return False, f"activation blocks of {block} along axis {axis} (one per token is K = {k})"
    if dims is not None and all(d == 1 for d in dims):
        return False, None
    return False, "activation scales per channel (the kernels take one per tensor or per token)"


def _quantization(graph: ir.Graph, dq: ir.Node) -> tuple[ir.Node, list[ir.Node]] | None:
    """(QuantizeLinear, its scale computation or []) when they serve this DequantizeLinear only."""
    xq, s = dq.inputs[0], dq.inputs[1]
    q = xq.producer()
    if not is_op(q, "QuantizeLinear") or single_consumer(xq, graph) is not dq:
        return None
    same = all(_input(q, i) is _input(dq, i) for i in (1, 2))
    attrs = all(_attr(q, a, None) == _attr(dq, a, None) for a in ("axis", "block_size"))
    if not same or not attrs or q.inputs[0] is None or q.inputs[0].dtype not in _FLOAT:
        return None
    if const_tensor(s) is not None:
        return q, []
    if s in graph.outputs or {id(u.node) for u in s.uses()} != {id(q), id(dq)}:
        return None  # the scale is read elsewhere too: quantize outside
    return q, _scale_chain(graph, s, q.inputs[0])


def _scale_chain(graph: ir.Graph, s: ir.Value, x: ir.Value) -> list[ir.Node]:
    """[Abs, ReduceMax, Div, Max] computing s = max(ReduceMax(|x|) / qmax, floor), or []."""
    mx = s.producer()
    if not is_op(mx, "Max") or len(mx.inputs) != 2:
        return []
    ratio = next((v for v in mx.inputs if const_scalar(v) is None), None)
    div = ratio.producer() if ratio is not None else None
    if const_scalar(other_input(mx, ratio)) is None or not is_op(div, "Div"):
        return []
    red = div.inputs[0].producer() if div.inputs[0] is not None else None
    if const_scalar(div.inputs[1]) is None or not is_op(red, "ReduceMax"):
        return []
    axes = _input(red, 1)
    ab = red.inputs[0].producer() if red.inputs[0] is not None else None
    if (axes is not None and const_tensor(axes) is None) or not is_op(ab, "Abs"):
        return []
    inner = ((ab, red), (red, div), (div, mx))
    if ab.inputs[0] is not x or any(
        single_consumer(a.outputs[0], graph) is not b for a, b in inner
    ):
        return []  # an intermediate read outside, or the absmax of another tensor
    return [ab, red, div, mx]


def _own_copy(graph: ir.Graph, dq: ir.Node, matmul: ir.Node) -> ir.Node:
    """A copy of the shared activation DequantizeLinear ``dq`` that feeds ``matmul`` only."""
    copy = ir.Node(
        "",
        "DequantizeLinear",
        list(dq.inputs),
        [ir.Attr(a.name, a.type, a.value) for a in dq.attributes.values()],
        name=f"{module_of(matmul) or matmul.name}/dequantize_input",
        metadata_props=dict(dq.metadata_props),  # the act-quant record, and a module path
    )
    if module_of(matmul):
        set_module(copy, module_of(matmul))
    out, original = copy.outputs[0], dq.outputs[0]
    out.name = unique_name(graph, f"{original.name or 'activation'}_{matmul.name or 'matmul'}")
    out.type, out.shape = original.type, original.shape
    graph.insert_before(matmul, copy)
    matmul.replace_input_with(0, out)
    return copy


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default
