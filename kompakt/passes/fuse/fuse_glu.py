"""fuse-glu: the gate of a gated MLP, ``act(gate) * up`` (SwiGLU, GeGLU), as one kernel.

Exported, Llama's SwiGLU is three full passes over [tokens, F] (Sigmoid, Mul for silu, the gating
Mul). Once merge-projections has made gate/up one GEMM, gate and up are the two halves of its
output (Split views with row stride 2F); the ``glu`` codegen family reads them in place, where a
generic pointwise kernel would first copy each half to a contiguous tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.ir.fused import fuse_nodes
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.fuse.match import Roles, is_op, other_input, same_shape, single_consumer
from kompakt.passes.registry import register_pass

_D = ir.DataType
_FLOAT = (_D.FLOAT, _D.FLOAT16, _D.BFLOAT16)
_GELU_KINDS = {"none": "gelu", "tanh": "gelu_tanh"}


@register_pass
@dataclass(frozen=True)
class FuseGlu(Pass):
    """Fuse a gated linear unit ``act(gate) * up`` into one ``glu`` kernel.

    Before: s = Sigmoid(g);  a = Mul(g, s);  y = Mul(a, u)          # silu(g) * u (SwiGLU)
            a = Gelu(g, approximate="none" | "tanh");  y = Mul(a, u)  # GeGLU
    After:  y = kompakt::FusedKernel[pattern="glu", kind="silu" | "gelu" | "gelu_tanh",
                                     roles=["gate", "up"]](g, u)

    Mul operands may come in either order. g and u must be float tensors of one dtype and the
    same shape, proven from the inferred shapes (symbolic dims by name): the kernel does not
    broadcast. Every value inside the group must be read only there (a silu output that something
    else also reads stays unfused). The kernel computes in fp32 and rounds once, where an fp16
    body rounds after each op: equal to the body up to that rounding.

    On weight-only GPU targets fuse-dequant-matmul runs first and takes the GLU of a merged
    gate/up GEMM into that GEMM's epilogue (its ``glu`` option, with `match_glu` deciding what a
    GLU is); this pass fuses the GLUs left, e.g. after a float GEMM.
    """

    name: ClassVar[str] = "fuse-glu"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        fused, kept = 0, []
        for node in list(graph):
            if node.graph is not graph or not (is_op(node, "Sigmoid") or is_op(node, "Gelu")):
                continue
            found = match_glu(node, graph)
            if found is None:
                continue
            if isinstance(found, str):
                kept.append(f"{node.name}: {found}")
                continue
            nodes, gate, up, kind = found
            roles = Roles()
            roles.add(gate, "gate")
            roles.add(up, "up")
            fused_node = fuse_nodes(model, nodes, "glu", [ir.AttrString("kind", kind)])
            fused_node.attributes["roles"] = roles.attribute(fused_node)
            fused += 1
        return PassResult(changed=fused > 0, stats={"fused": fused, "kept": len(kept)}, notes=kept)


def match_glu(start: ir.Node, graph: ir.Graph):
    """(nodes, gate, up, kind) for the GLU that ``start`` (a Sigmoid or Gelu) begins; None when
    it begins none; a reason (str) when it is one the kernel cannot take."""
    gate = start.inputs[0]
    if is_op(start, "Gelu"):
        approximate = start.attributes.get("approximate")
        mode = approximate.as_string() if approximate is not None else "none"
        kind, activated, nodes = _GELU_KINDS.get(mode), start.outputs[0], [start]
        if kind is None:
            return f"Gelu approximate='{mode}' is not a GLU kind the kernel has"
    else:
        silu = single_consumer(start.outputs[0], graph)
        if not is_op(silu, "Mul") or other_input(silu, start.outputs[0]) is not gate:
            return None  # a Sigmoid that is not half of silu(g) = g * sigmoid(g)
        kind, activated, nodes = "silu", silu.outputs[0], [start, silu]
    gating = single_consumer(activated, graph)
    up = other_input(gating, activated) if is_op(gating, "Mul") else None
    if up is None:
        return None  # an activation that gates nothing
    if gate.dtype not in _FLOAT or up.dtype != gate.dtype:
        return f"gate is {_name(gate.dtype)} and up {_name(up.dtype)}; one float dtype needed"
    if not same_shape(gate, up) or not same_shape(gate, gating.outputs[0]):
        return f"gate {gate.shape} and up {up.shape} are not proven the same shape"
    return [*nodes, gating], gate, up, kind


def _name(dtype: ir.DataType | None) -> str:
    return dtype.name if dtype is not None else "unknown"
