"""lower-to-matmulnbits: hand ONNX Runtime its 4/8-bit MatMul kernel directly.

ONNX Runtime fuses ``DequantizeLinear -> MatMul`` into MatMulNBits on its own, but not always:
measured with ORT 1.31, a MatMul followed by Relu and another quantized MatMul stays unfused,
and a MatMul followed by a residual Add is first turned into a Gemm, which the fusion skips
(OPT's fc1/fc2). Lowering explicitly makes the fast kernel a decision, not a hope.

MatMulNBits layout (ORT contrib op): B is uint8 [N, blocks, block_size * bits / 8], codes
unsigned with the low nibble first; scales [N * blocks]; zero points packed the same way per row
(4 bits) or uint8 [N * blocks] (8 bits), defaulting to 2^(bits-1) when absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.ir.builder import constant
from kompakt.ir.metadata import copy_module
from kompakt.ir.tensors import to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass

_D = ir.DataType
_SIGNED = {_D.INT4: 4, _D.INT8: 8}
_UNSIGNED = {_D.UINT4: 4, _D.UINT8: 8}
_ACTIVATIONS = (_D.FLOAT, _D.FLOAT16)
DOMAIN = "com.microsoft"


@register_pass
@dataclass(frozen=True)
class LowerToMatMulNBits(Pass):
    """Rewrite MatMuls of dequantized 4/8-bit weights as ONNX Runtime's MatMulNBits.

    Before: y = MatMul(x, DequantizeLinear(q: u4[K, N], s: f32[K/g, N], z: u4[K/g, N],
                                           axis=0, block_size=g))
    After:  y = com.microsoft::MatMulNBits(x, B: u8[N, K/g, g/2], s: f32[N*K/g], z: u8[N*K/g/2],
                                           K=K, N=N, bits=4, block_size=g)

    Args:
        accuracy_level: ORT's compute mode: 0/1 float32, 4 int8 activations (fastest on CPU).
        block_size_8bit: Kernel block for 8-bit weights (scales are repeated to fill it). At
            accuracy level 4 ORT quantizes activations per block; with 8-bit weights that error
            dominates, and 32 keeps all-MiniLM-L6-v2's embedding cosine at 0.9994 where 128 gives
            0.9988, at about the same speed (measured 2026-11-22, see benchmarks/RESULTS.md).
    """

    name: ClassVar[str] = "lower-to-matmulnbits"
    accuracy_level: int = 4
    block_size_8bit: int = 32

    def __post_init__(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4; got {self.accuracy_level}")
        size = self.block_size_8bit
        if size < 16 or size & (size - 1):
            raise ValueError(f"block_size_8bit must be a power of two >= 16; got {size}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        lowered, skipped = 0, []
        for dq in [
            n for n in graph if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx")
        ]:
            reason = _why_not(dq)
            if reason is not None:
                if reason:
                    skipped.append(f"{dq.name}: {reason}")
                continue
            packed = _pack(graph, dq, self.block_size_8bit)
            for use in list(dq.outputs[0].uses()):
                _replace_matmul(graph, use.node, packed, self.accuracy_level)
                lowered += 1
            _remove_if_unused(graph, dq)
        if lowered:
            model.opset_imports.setdefault(DOMAIN, 1)
        return PassResult(changed=lowered > 0, stats={"lowered": lowered}, notes=skipped)


@dataclass
class _Packed:
    b: ir.Value
    scales: ir.Value
    zero_points: ir.Value | None
    k: int
    n: int
    bits: int
    block_size: int


def _why_not(dq: ir.Node) -> str | None:
    """None if lowerable; "" if not a weight (silently kept); else a reason for the report."""
    q = dq.inputs[0]
    if q is None or q.const_value is None or len(q.const_value.shape) != 2:
        return ""
    uses = dq.outputs[0].uses()
    if not uses or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
        return ""
    if q.dtype not in _SIGNED and q.dtype not in _UNSIGNED:
        return f"{q.dtype.name} weights (MatMulNBits takes 4 or 8 bits)"
    scale = dq.inputs[1]
    if scale is None or scale.const_value is None or scale.dtype not in _ACTIVATIONS:
        return "scale is not a float/float16 constant"
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and dq.inputs[2].const_value is None:
        return "zero point is not a constant"
    activations = [u.node.inputs[0] for u in uses]
    if any(a is None or (a.dtype is not None and a.dtype != scale.dtype) for a in activations):
        return "activation dtype differs from the scale dtype"
    if any(_statically_quantized(a) for a in activations):
        # Static Q/DQ on the activation too (W8A8): ORT runs the pair as its int8 GEMM
        # (MatMulIntegerToFloat); MatMulNBits would compute in float from fake-quantized inputs.
        # Per-token (dynamic) scales are computed in the graph, which ORT does not fuse: those
        # keep MatMulNBits.
        return "the activation is quantized too (left to ONNX Runtime's integer GEMM)"
    return _layout_problem(dq, axis_of(dq), scale)


def _statically_quantized(activation: ir.Value) -> bool:
    producer = activation.producer()
    return (
        producer is not None
        and producer.op_type == "DequantizeLinear"
        and producer.inputs[1] is not None
        and producer.inputs[1].const_value is not None
    )


def axis_of(dq: ir.Node) -> int:
    axis = dq.attributes.get("axis")
    return 1 if axis is None else axis.value


def _layout_problem(dq: ir.Node, axis: int, scale: ir.Value) -> str | None:
    block = dq.attributes.get("block_size")
    if block is not None and block.value:
        size = block.value
        if axis != 0 or size < 16 or size & (size - 1):
            return f"blocks of {size} along axis {axis} (MatMulNBits needs a power of two >= 16 along K)"
    elif len(scale.const_value.shape) > 1 or (axis not in (1, -1) and scale.const_value.size != 1):
        return "per-axis scales along K"
    return None


def _pack(graph: ir.Graph, dq: ir.Node, block_size_8bit: int) -> _Packed:
    q_value, s_value = dq.inputs[0], dq.inputs[1]
    zp_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    signed = q_value.dtype in _SIGNED
    bits = (_SIGNED if signed else _UNSIGNED)[q_value.dtype]
    offset = 1 << (bits - 1) if signed else 0  # signed values shift into unsigned codes
    q = to_torch(q_value.const_value).to(torch.int32) + offset
    k, n = q.shape
    scale = to_torch(s_value.const_value)
    block_attr = dq.attributes.get("block_size")
    if block_attr is not None and block_attr.value:
        block = block_attr.value
        scale = scale.reshape(-1, n)  # [blocks, N]
    else:  # per channel (or per tensor): the same scale in every block
        block = min(128, max(16, 1 << (k - 1).bit_length()))
        scale = _rows(scale).expand(-(-k // block), n)
    blocks = -(-k // block)
    if zp_value is not None:
        zero = _rows(to_torch(zp_value.const_value).to(torch.int32)).expand(blocks, n) + offset
    else:
        zero = torch.full((blocks, n), offset, dtype=torch.int32)
    if bits == 8 and block > block_size_8bit:  # split blocks; each part keeps its group's scale
        repeat = block // block_size_8bit
        block = block_size_8bit
        blocks = -(-k // block)
        scale = scale.repeat_interleave(repeat, 0)[:blocks]
        zero = zero.repeat_interleave(repeat, 0)[:blocks]
    default_zero = 1 << (bits - 1)

    codes = torch.cat([q, zero.repeat_interleave(block, 0)[k:]])  # pad K with zero codes
    codes = codes.t().reshape(n, blocks, block)
    base = q_value.name or "w"
    b = constant(graph, _pack_rows(codes, bits), f"{base}_nbits")
    scales = constant(graph, scale.t().contiguous().reshape(-1), f"{base}_nbits_scales")
    zero_points = None
    if not bool((zero == default_zero).all()):
        zero_rows = zero.t().contiguous()  # [N, blocks]
        zero_points = constant(
            graph, _pack_rows(zero_rows, bits).reshape(-1), f"{base}_nbits_zero_points"
        )
    return _Packed(b, scales, zero_points, k, n, bits, block)


def _rows(param: torch.Tensor) -> torch.Tensor:
    """A scale or zero point as [blocks or 1, N or 1], ready to expand to [blocks, N]."""
    return param.reshape(-1, param.shape[-1]) if param.dim() else param.reshape(1, 1)


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs the last dim: 8 bits as is; 4 bits two per byte, low nibble first (odd: padded)."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _replace_matmul(graph: ir.Graph, matmul: ir.Node, packed: _Packed, accuracy_level: int) -> None:
    inputs = [matmul.inputs[0], packed.b, packed.scales]
    if packed.zero_points is not None:
        inputs.append(packed.zero_points)
    node = ir.node(
        "MatMulNBits",
        inputs,
        attributes={
            "K": packed.k,
            "N": packed.n,
            "bits": packed.bits,
            "block_size": packed.block_size,
            "accuracy_level": accuracy_level,
        },
        domain=DOMAIN,
        name=f"{matmul.name or 'matmul'}/nbits",
    )
    copy_module(matmul, node)
    old = matmul.outputs[0]
    new = node.outputs[0]
    new.type, new.shape = old.type, old.shape
    ir.convenience.replace_nodes_and_values(graph, matmul, [matmul], [node], [old], [new])


def _remove_if_unused(graph: ir.Graph, dq: ir.Node) -> None:
    if dq.outputs[0].uses() or dq.outputs[0].is_graph_output():
        return
    inputs = [v for v in dq.inputs if v is not None]
    graph.remove(dq, safe=True)
    for value in inputs:
        if not value.uses() and value.is_initializer() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
