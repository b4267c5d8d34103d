"""gemm-to-matmul: one form for every linear layer, so compression passes see them all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.ir.builder import constant
from kompakt.ir.metadata import copy_module, module_of
from kompakt.ir.tensors import from_torch, to_torch, torch_dtype
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class GemmToMatMul(Pass):
    """Rewrite Gemm as MatMul (+ Add), folding transposes and scales into constant weights.

    GPT-2's and OPT's linear layers export as Gemm; Llama's as MatMul. After this pass every
    linear layer is a MatMul whose constant weight is stored [K, N], which is the form the
    quantization passes and ONNX Runtime's MatMulNBits fusion look for.

    Before: y = Gemm(a, B: f32[N, K], c, alpha=s, transB=1)
    After:  y = Add(MatMul(a, B': f32[K, N]), c)      with B' = s * Bᵀ folded into the constant
    """

    name: ClassVar[str] = "gemm-to-matmul"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        rewritten = 0
        for node in [n for n in graph if n.op_type == "Gemm" and n.domain in ("", "ai.onnx")]:
            _rewrite(graph, node)
            rewritten += 1
        return PassResult(changed=rewritten > 0, stats={"rewritten": rewritten})


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _rewrite(graph: ir.Graph, node: ir.Node) -> None:
    a, b, *rest = node.inputs
    c = rest[0] if rest else None
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    trans_a, trans_b = int(_attr(node, "transA", 0)), int(_attr(node, "transB", 0))
    new_nodes: list[ir.Node] = []
    stem = node.name or "gemm"

    def emit(op: str, inputs, suffix: str, **attrs) -> ir.Value:
        new = ir.node(op, inputs, attributes=attrs or None, name=f"{stem}/{suffix}")
        copy_module(node, new)
        new.outputs[0].name = f"{stem}/{suffix}_out"
        new_nodes.append(new)
        return new.outputs[0]

    if trans_a:
        a = emit("Transpose", [a], "transpose_a", perm=[1, 0])
    b = _prepare_weight(graph, node, b, trans_b, alpha, emit)
    y = emit("MatMul", [a, b], "matmul")
    if c is not None and beta != 0.0:
        c = _scaled(graph, node, c, beta, "bias", emit)
        y = emit("Add", [y, c], "bias")
    old = node.outputs[0]
    y.type, y.shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [old], [y])


def _prepare_weight(graph, node, b: ir.Value, trans_b: int, alpha: float, emit) -> ir.Value:
    if b.const_value is None:
        if trans_b:
            b = emit("Transpose", [b], "transpose_b", perm=[1, 0])
        return _scaled(graph, node, b, alpha, "alpha", emit)
    weight = to_torch(b.const_value)
    if trans_b:
        weight = weight.t()
    if alpha != 1.0:
        weight = weight * alpha
    if not trans_b and alpha == 1.0:
        return b
    module = module_of(node)
    name = f"{module}.weight" if module else f"{node.name or 'gemm'}.weight"
    if len(b.uses()) == 1 and b.is_initializer():
        # Sole user: rewrite the initializer in place (no copy of the weight left behind).
        b.const_value = from_torch(weight.contiguous(), name=b.name)
        b.shape = ir.Shape(list(weight.shape))
        return b
    return constant(graph, weight.contiguous(), name)


def _scaled(graph, node, value: ir.Value, factor: float, suffix: str, emit) -> ir.Value:
    if factor == 1.0:
        return value
    if value.const_value is not None:
        return constant(graph, to_torch(value.const_value) * factor, f"{node.name}_{suffix}")
    dtype = torch.float32 if value.dtype is None else torch_dtype(value.dtype)
    scale = constant(graph, torch.tensor(factor, dtype=dtype), f"{node.name}_{suffix}_scale")
    return emit("Mul", [value, scale], suffix)
