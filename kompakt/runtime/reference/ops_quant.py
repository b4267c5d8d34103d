"""Quantization ops: QuantizeLinear, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger,
QLinearMatMul and ONNX Runtime's ``com.microsoft::MatMulNBits``.

Quantize/Dequantize follow the opset 21 definitions (per-tensor, per-axis and blocked scales,
QuantizeLinear's ``output_dtype``) and opset 23's additions (DequantizeLinear's ``output_dtype``,
QuantizeLinear's ``precision``). Integer quantization rounds half to even and
saturates to the target range; 4-bit values are held unpacked in int8/uint8. Float8 targets
go through Cast's float8 conversion (``saturate`` attribute). Dequantization subtracts the zero
point exactly (in int64) before converting, then multiplies in at least float32, which rounds
the same as a multiplication in float16/bfloat16 would.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from kompakt.ir.tensors import ONNX_TO_TORCH, TORCH_TO_ONNX
from kompakt.runtime.reference._common import has_input, norm_axis, onnx_dtype_attr, op
from kompakt.runtime.reference.ops_cast import FLOAT8, cast_to
from kompakt.runtime.reference.registry import Kernel, NodeInfo

D = ir.DataType
_RANGES = {
    D.UINT8: (0, 255),
    D.INT8: (-128, 127),
    D.UINT16: (0, 65535),
    D.INT16: (-32768, 32767),
    D.UINT4: (0, 15),
    D.INT4: (-8, 7),
}


def _broadcast_param(
    param: torch.Tensor, x: torch.Tensor, axis: int, block_size: int
) -> torch.Tensor:
    """A scale or zero point shaped to broadcast against ``x``."""
    if param.dim() == 0 or param.numel() == 1:  # per tensor
        return param.reshape(())
    a = norm_axis(axis, x.dim())
    if block_size > 0:  # blocked: each scale covers block_size consecutive elements along axis
        return param.repeat_interleave(block_size, dim=a).narrow(a, 0, x.shape[a])
    return param.reshape((-1,) + (1,) * (x.dim() - a - 1))  # per axis


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@op("DequantizeLinear")
def dequantize_linear(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 1)
    block_size = node.attr("block_size", 0)
    out_attr = onnx_dtype_attr(node, "output_dtype", 0) if node.opset >= 23 else None  # new in 23
    out_dtype = ONNX_TO_TORCH[out_attr] if out_attr else None

    def kernel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None):
        target = out_dtype or scale.dtype
        compute = _compute_dtype(target)
        exact = not x.is_floating_point()  # integers: subtract the zero point exactly
        values = x.to(torch.int64) if exact else x.to(compute)
        if zero_point is not None:
            zp = _broadcast_param(zero_point, x, axis, block_size)
            values = values - (zp.to(torch.int64) if exact else zp.to(compute))
        scale = _broadcast_param(scale, x, axis, block_size).to(compute)
        return (values.to(compute) * scale).to(target)

    return kernel


def _quantize_target(node: NodeInfo) -> ir.DataType | None:
    """The ONNX output type: output_dtype, else the zero point's type, else the declared one."""
    attr = onnx_dtype_attr(node, "output_dtype", 0) if node.opset >= 21 else None
    if attr:
        return attr
    if has_input(node, 2) and node.input_dtype(2) is not None:
        return node.input_dtype(2)
    return node.node.outputs[0].dtype


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    to: ir.DataType,
    *,
    compute: torch.dtype = torch.float32,
    saturate: bool = True,
) -> torch.Tensor:
    """``saturate(round(x / scale) + zero_point)`` in the ONNX type ``to`` (broadcast params)."""
    scaled = x.to(compute) / scale.to(compute)
    if to in FLOAT8:
        if zero_point is not None:
            scaled = scaled + zero_point.to(compute)
        return cast_to(scaled, to, saturate)
    if to not in _RANGES:
        raise ValueError(f"QuantizeLinear to {to.name} is not supported")
    low, high = _RANGES[to]
    # Round half to even in the division's precision, then add the zero point exactly.
    q = torch.round(scaled).to(torch.float64)
    if zero_point is not None:
        q = q + zero_point.to(torch.float64)
    return torch.clamp(q, low, high).to(ONNX_TO_TORCH[to])


@op("QuantizeLinear")
def quantize_linear(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 1)
    block_size = node.attr("block_size", 0)
    saturate = bool(node.attr("saturate", 1))
    to = _quantize_target(node)
    if to is not None and to not in _RANGES and to not in FLOAT8:
        raise node.unsupported(f"quantizing to {to.name}")
    # Opset 23 made the precision of x / scale explicit; by default it is the scale's type.
    precision = onnx_dtype_attr(node, "precision", 0) if node.opset >= 23 else None

    def kernel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None):
        target = to
        if target is None:
            target = D.UINT8 if zero_point is None else TORCH_TO_ONNX[zero_point.dtype]
        compute = ONNX_TO_TORCH[precision] if precision else scale.dtype
        compute = compute if compute.is_floating_point else torch.float32
        if zero_point is not None:
            zero_point = _broadcast_param(zero_point, x, axis, block_size)
        scale = _broadcast_param(scale, x, axis, block_size)
        return quantize(x, scale, zero_point, target, compute=compute, saturate=saturate)

    return kernel


@op("DynamicQuantizeLinear")
def dynamic_quantize_linear(node: NodeInfo) -> Kernel:
    def kernel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xf = x.to(torch.float32)
        zero = xf.new_zeros(())
        low = torch.minimum(xf.min(), zero)  # the range always includes 0
        high = torch.maximum(xf.max(), zero)
        scale = (high - low) / 255
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero input
        zero_point = torch.clamp(torch.round(-low / safe), 0, 255)
        y = torch.clamp(torch.round(xf / safe) + zero_point, 0, 255)
        return y.to(torch.uint8), scale, zero_point.to(torch.uint8)

    return kernel


@op("MatMulInteger")
def matmul_integer(node: NodeInfo) -> Kernel:
    def kernel(a, b, a_zero_point=None, b_zero_point=None) -> torch.Tensor:
        # float64 holds every sum of int8/uint8 products exactly (|sum| < 2**53), and unlike
        # integer matmul it runs on every device.
        af, bf = a.to(torch.float64), b.to(torch.float64)
        if a_zero_point is not None:  # scalar, or one per row of A
            zp = a_zero_point.to(torch.float64)
            af = af - (zp.reshape(-1, 1) if zp.numel() > 1 else zp.reshape(()))
        if b_zero_point is not None:  # scalar, or one per column of B
            zp = b_zero_point.to(torch.float64)
            bf = bf - (zp.reshape(-1) if zp.numel() > 1 else zp.reshape(()))
        return torch.matmul(af, bf).to(torch.int32)

    return kernel


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes to one integer per element along the last axis, low bits first."""
    codes = packed.to(torch.int16)
    if bits == 8:
        return codes
    return torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)


@op("MatMulNBits", domain="com.microsoft")
def matmul_nbits(node: NodeInfo) -> Kernel:
    k, n = node.attr("K"), node.attr("N")
    bits = node.attr("bits", 4)
    block_size = node.attr("block_size")
    if bits not in (4, 8):
        raise node.unsupported(f"bits={bits} (only 4 and 8 are supported)")
    if has_input(node, 4):
        raise node.unsupported("g_idx (act-order) input")
    n_blocks = math.ceil(k / block_size)

    def kernel(a, b, scales, zero_points=None, g_idx=None, bias=None) -> torch.Tensor:
        compute = _compute_dtype(a.dtype)
        codes = _unpack(b.reshape(n, n_blocks, -1), bits).to(compute)  # [N, blocks, block]
        scale = scales.reshape(n, n_blocks, 1).to(compute)
        if zero_points is None:
            zp = 2 ** (bits - 1)
        elif zero_points.dtype == torch.uint8:  # packed like B, each row padded to a byte
            zp = _unpack(zero_points.reshape(n, -1), bits)[:, :n_blocks]
            zp = zp.reshape(n, n_blocks, 1).to(compute)
        else:
            zp = zero_points.reshape(n, n_blocks, 1).to(compute)
        weight = ((codes - zp) * scale).reshape(n, -1)[:, :k]  # [N, K]
        y = torch.matmul(a.to(compute), weight.T)
        if bias is not None:
            y = y + bias.to(compute)
        return y.to(a.dtype)

    return kernel


@op("QLinearMatMul")
def qlinear_matmul(node: NodeInfo) -> Kernel:
    to = node.node.outputs[0].dtype or node.input_dtype(7)
    if to is not None and to not in _RANGES:
        raise node.unsupported(f"output type {to.name}")

    def kernel(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
        a_scale, a_zero_point = (_per_row(t) for t in (a_scale, a_zero_point))
        # The integer product is exact in float64 (|sum| < 2**53).
        acc = torch.matmul(
            a.to(torch.float64) - a_zero_point.to(torch.float64),
            b.to(torch.float64) - b_zero_point.to(torch.float64),
        )
        # One requantization multiplier, formed in the scales' own type, as ONNX's reference.
        multiplier = (a_scale * b_scale / y_scale).to(torch.float64)
        q = torch.round(acc * multiplier) + y_zero_point.to(torch.float64)
        low, high = _RANGES[to or TORCH_TO_ONNX[y_zero_point.dtype]]
        return torch.clamp(q, low, high).to(y_zero_point.dtype)

    return kernel


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """A 1-D per-row parameter of A as a column; scalars and N-D ones broadcast as given."""
    return t.reshape(-1, 1) if t.dim() == 1 and t.numel() > 1 else t
