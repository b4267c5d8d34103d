"""Cast, CastLike and BitCast, and `cast_to`, the conversion the quantization ops share.

Narrowing integer casts keep the low bits (two's complement), which is what ``Tensor.to`` does;
the 4-bit integers, held unpacked in int8/uint8, are wrapped explicitly. Casts to float8 follow
the ``saturate`` attribute (opset 19): saturating casts clamp to the largest finite value (inf
included), non-saturating ones give NaN (e4m3) or inf (e5m2), which is what torch's conversion
does after rounding to nearest even (except for e4m3fn, which torch saturates).
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from kompakt.ir.tensors import ONNX_TO_TORCH, TORCH_TO_ONNX
from kompakt.runtime.reference._common import check_dtype, onnx_dtype_attr, op
from kompakt.runtime.reference.registry import Kernel, NodeInfo

D = ir.DataType
FLOAT8 = frozenset({D.FLOAT8E4M3FN, D.FLOAT8E4M3FNUZ, D.FLOAT8E5M2, D.FLOAT8E5M2FNUZ})
_TORCH_FLOAT8 = frozenset(ONNX_TO_TORCH[d] for d in FLOAT8)


def cast_to(x: torch.Tensor, to: ir.DataType, saturate: bool = True) -> torch.Tensor:
    """``x`` converted to the ONNX dtype ``to`` with ONNX Cast semantics."""
    target = ONNX_TO_TORCH[to]
    if x.dtype in _TORCH_FLOAT8 and target != x.dtype:
        x = x.to(torch.float32)  # torch converts float8 to floats only
    if to in (D.INT4, D.UINT4):
        bits = x.to(torch.int64) & 0xF
        if to == D.INT4:
            bits = bits - ((bits & 0x8) << 1)  # sign-extend bit 3
        return bits.to(target)
    if to in FLOAT8:
        if not x.is_floating_point():
            x = x.to(torch.float32)
        if saturate:
            limit = torch.finfo(target).max
            return torch.clamp(x, -limit, limit).to(target)  # NaN stays NaN
        y = x.to(target)
        if target == torch.float8_e4m3fn:
            # torch saturates this type; without saturation ONNX gives NaN past the rounding
            # boundary (464 = 448 + half an ulp, which rounds to even, 448).
            nan = torch.full_like(y, float("nan"))
            y = torch.where(x.abs() > 464, nan, y)
        return y
    return x.to(target)


@op("Cast")
def cast(node: NodeInfo) -> Kernel:
    to = onnx_dtype_attr(node, "to")
    saturate = bool(node.attr("saturate", 1))
    return lambda x: cast_to(x, to, saturate)


@op("CastLike")
def cast_like(node: NodeInfo) -> Kernel:
    saturate = bool(node.attr("saturate", 1))
    to = node.input_dtype(1) or node.node.outputs[0].dtype
    if to is not None:
        check_dtype(node, to, "target type")
        return lambda x, like: cast_to(x, to, saturate)

    def kernel(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Without a declared type the target is the tensor's own dtype (never a 4-bit one).
        return cast_to(x, TORCH_TO_ONNX[like.dtype], saturate)

    return kernel


@op("BitCast")
def bit_cast(node: NodeInfo) -> Kernel:
    to = onnx_dtype_attr(node, "to")
    source = node.input_dtype(0)
    sub_byte = (D.INT4, D.UINT4)
    if to in sub_byte or source in sub_byte:
        raise node.unsupported("4-bit types are held unpacked, so their bits cannot be viewed")
    if source is not None and source.bitwidth != to.bitwidth:
        raise node.unsupported(f"{source.name} and {to.name} differ in width")
    target = ONNX_TO_TORCH[to]
    return lambda x: x.view(target)
