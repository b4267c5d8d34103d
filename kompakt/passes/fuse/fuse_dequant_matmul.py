"""fuse-dequant-matmul: a quantized weight's dequantization, its MatMul and the epilogue after it.

Weight-only quantized layers (W4A16/W8A16) are written as DequantizeLinear feeding MatMul; run op
by op, the float weight is materialized in memory every call, which costs more than the int4 saves.
Fused, one kernel reads the packed integers and dequantizes tile by tile in registers (codegen
family ``dequant_matmul``), and applies what follows the MatMul in the same pass over the output:
a bias, an activation, a residual add, or the gated activation of a merged gate/up projection
(``act(gate) * up``, read from the halves of the GEMM's output), so the glu kernel's launch and
the [M, 2F] round trip through memory go too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.fused import fuse_nodes
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.fuse_glu import match_glu
from kompakt.passes.fuse.match import (
    Roles,
    const_ints,
    is_op,
    other_input,
    same_shape,
    single_consumer,
)
from kompakt.passes.registry import register_pass

_D = ir.DataType
_BITS = {_D.INT4: 4, _D.UINT4: 4, _D.INT8: 8, _D.UINT8: 8}
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)


@register_pass
@dataclass(frozen=True)
class FuseDequantMatMul(Pass):
    """Fuse DequantizeLinear -> MatMul [-> Add bias] [-> activation] [-> Add residual].

    Before: w = DequantizeLinear(q: i4[K, N], s: f16[K/g, N], axis=0, block_size=g)
            y = Add(Silu(Add(MatMul(x, w), b)), r)
    After:  y = kompakt::FusedKernel[pattern="dequant_matmul", act="silu",
                                     roles=["q", "scale", "x", "bias", "residual"]](q, s, x, b, r)

    Activations recognised: Relu, Gelu (opset 20, erf or tanh), and SiLU written as
    ``Mul(y, Sigmoid(y))``. The epilogue grows only while each intermediate has one consumer, so
    nothing computed inside the kernel is needed outside it.

    With ``glu``, a gated MLP's merged gate/up projection (merge-projections' output) takes its
    GLU in as a gated activation::

        Before: gate, up = Split(MatMul(x, w), axis=-1)       # two equal halves
                y = Mul(Mul(gate, Sigmoid(gate)), up)          # or Mul(Gelu(gate), up)
        After:  y = kompakt::FusedKernel[pattern="dequant_matmul", act="glu_silu", ...](q, s, x)

    (the binder interleaves the weight's gate and up columns so that each output tile holds
    both halves of its columns; fuse-glu's match decides what a GLU is).

    Args:
        epilogues: Also take bias, activation and residual into the kernel (else the MatMul only).
        glu: Also take a Split into gate and up and their GLU (needs ``epilogues``).
    """

    name: ClassVar[str] = "fuse-dequant-matmul"
    epilogues: bool = True
    glu: bool = True

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        fused, kept = 0, []
        for matmul in [n for n in model.graph if n.op_type == "MatMul" and n.domain == ""]:
            dq = _weight_dequantization(matmul)
            if dq is None:
                continue
            reason = _why_not(dq, matmul)
            if reason:
                kept.append(f"{matmul.name}: {reason}")
                continue
            group, roles, attrs = _grow(model.graph, dq, matmul, self.epilogues, self.glu)
            node = fuse_nodes(model, group, "dequant_matmul", attrs)
            node.attributes["roles"] = roles.attribute(node)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused, "kept": len(kept)}, notes=kept)


def _weight_dequantization(matmul: ir.Node) -> ir.Node | None:
    weight = matmul.inputs[1]
    producer = weight.producer() if weight is not None else None
    if producer is None or producer.op_type != "DequantizeLinear" or producer.domain != "":
        return None
    q = producer.inputs[0]
    return producer if q is not None and q.const_value is not None else None


def _why_not(dq: ir.Node, matmul: ir.Node) -> str | None:
    q, scale = dq.inputs[0], dq.inputs[1]
    if q.dtype not in _BITS:
        return f"{q.dtype.name} weights (the kernels take 4 or 8 bits)"
    if len(q.const_value.shape) != 2:
        return "the weight is not 2-D"
    if scale is None or scale.const_value is None:
        return "the scale is not a constant"
    zero = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zero is not None and zero.const_value is None:
        return "the zero point is not a constant"
    if len(dq.outputs[0].uses()) != 1:
        return "the dequantized weight has several consumers"
    x = matmul.inputs[0]
    if x is None or x.dtype not in _FLOAT:
        return "the activation is not float"
    producer = x.producer()
    if producer is not None and producer.op_type == "DequantizeLinear":
        return "the activation is quantized too (W8A8 runs as an integer GEMM)"
    axis = dq.attributes.get("axis")
    axis = 1 if axis is None else axis.value
    block = dq.attributes.get("block_size")
    blocked = block is not None and block.value
    if blocked and axis != 0:
        return f"blocks along axis {axis} (kernels take groups along K)"
    if not blocked and scale.const_value.size != 1 and axis not in (1, -1):
        return "per-row scales along K"
    return None


def _grow(graph: ir.Graph, dq: ir.Node, matmul: ir.Node, epilogues: bool, glu: bool = True):
    """The group (dq, matmul, epilogue nodes), the roles of each outside input (one value may
    have two, as in ``x + proj(x)``: x and residual), the attributes."""
    roles = Roles()
    roles.add(dq.inputs[0], "q")
    roles.add(dq.inputs[1], "scale")
    roles.add(matmul.inputs[0], "x")
    if len(dq.inputs) > 2:
        roles.add(dq.inputs[2], "zero")
    group = [dq, matmul]
    act, has_bias, has_residual = "none", False, False
    y = matmul.outputs[0]
    n = dq.inputs[0].const_value.shape[1]
    if epilogues:
        # bias: Add with a constant [N]
        nxt = single_consumer(y, graph)
        other = other_input(nxt, y) if nxt is not None and nxt.op_type == "Add" else None
        if other is not None and other.const_value is not None and other.shape == ir.Shape([n]):
            roles.add(other, "bias")
            group.append(nxt)
            y, has_bias = nxt.outputs[0], True
        act_nodes, act = _gated(y, graph) if glu else ([], "none")
        if act_nodes:  # the Split's sizes (two equal halves, checked) ride along
            split_sizes = act_nodes[0].inputs[1] if len(act_nodes[0].inputs) > 1 else None
            roles.add(split_sizes, "split_sizes")
        else:
            act_nodes, act = _activation(y, graph)
        if act_nodes:
            group.extend(act_nodes)
            y = act_nodes[-1].outputs[0]
        nxt = single_consumer(y, graph)
        other = other_input(nxt, y) if nxt is not None and nxt.op_type == "Add" else None
        if other is not None and other.const_value is None and same_shape(other, y):
            roles.add(other, "residual")
            group.append(nxt)
            has_residual = True
    attrs = [
        ir.AttrString("act", act),
        ir.AttrInt64("has_bias", int(has_bias)),
        ir.AttrInt64("has_residual", int(has_residual)),
    ]
    return group, roles, attrs


def _gated(y: ir.Value, graph: ir.Graph) -> tuple[list[ir.Node], str]:
    """``Split(y)`` into two equal halves of the last axis, feeding ``act(first) * second``:
    the nodes and ``glu_<act>``; else no nodes."""
    split = single_consumer(y, graph)
    if not is_op(split, "Split") or len(split.outputs) != 2 or y.shape is None:
        return [], "none"
    rank, n = len(y.shape), y.shape[-1]
    if split.attributes.get_int("axis", 0) % rank != rank - 1 or not isinstance(n, int) or n % 2:
        return [], "none"
    sizes = split.inputs[1] if len(split.inputs) > 1 else None
    if sizes is not None and const_ints(sizes) != [n // 2, n // 2]:
        return [], "none"
    gate, up = split.outputs
    if gate.is_graph_output() or up.is_graph_output():
        return [], "none"
    starts = [u.node for u in gate.uses() if is_op(u.node, "Sigmoid") or is_op(u.node, "Gelu")]
    found = match_glu(starts[0], graph) if len(starts) == 1 else None
    if found is None or isinstance(found, str):
        return [], "none"
    nodes, g, u, kind = found
    inside = {id(node) for node in nodes}
    if g is not gate or u is not up or any(id(use.node) not in inside for use in gate.uses()):
        return [], "none"
    if len(up.uses()) != 1:
        return [], "none"
    return [split, *nodes], f"glu_{kind}"


def _activation(y: ir.Value, graph: ir.Graph) -> tuple[list[ir.Node], str]:
    if y in graph.outputs:
        return [], "none"
    uses = [u.node for u in y.uses()]
    if len(uses) == 1 and uses[0].op_type == "Relu":
        return [uses[0]], "relu"
    if len(uses) == 1 and uses[0].op_type == "Gelu":
        approx = uses[0].attributes.get("approximate")
        kind = approx.as_string() if approx is not None else "none"
        return [uses[0]], "gelu_tanh" if kind == "tanh" else "gelu"
    if len(uses) == 2:  # SiLU: Mul(y, Sigmoid(y))
        sig = next((u for u in uses if u.op_type == "Sigmoid"), None)
        mul = next((u for u in uses if u.op_type == "Mul"), None)
        if (
            sig is not None
            and mul is not None
            and single_consumer(sig.outputs[0], graph) is mul
            and set(map(id, mul.inputs)) == {id(y), id(sig.outputs[0])}
        ):
            return [sig, mul], "silu"
    return [], "none"
