"""Helpers shared by the op modules of the reference runtime.

`op` wraps `registry.op` with a build-time check of the node's value types, so that a node on a
sequence, an optional, a string or a dtype torch cannot hold (float4, float8e8m0, int2, ...)
fails when the plan is built, never at run time and never silently. The other helpers cover what
many ops share: axis normalization, constant inputs known at build time, and computing on the
unsigned integer types that torch implements only partially (uint16/32/64).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir
import torch

from kompakt.ir.tensors import ONNX_TO_TORCH, to_torch
from kompakt.runtime.reference.registry import NodeInfo, OpBuilder
from kompakt.runtime.reference.registry import op as _register

# torch stores these but implements few kernels for them: compute through int64 instead.
WIDE_UNSIGNED = (torch.uint16, torch.uint32)
INT64_MIN = -(2**63)


def op(*op_types: str, domain: str = "") -> Callable[[OpBuilder], OpBuilder]:
    """Like `registry.op`, but the builder first rejects values torch cannot represent."""

    def register(builder: OpBuilder) -> OpBuilder:
        def checked(node: NodeInfo) -> Callable:
            check_value_types(node)
            return builder(node)

        checked.__name__ = builder.__name__
        checked.__doc__ = builder.__doc__
        _register(*op_types, domain=domain)(checked)
        return builder

    return register


def check_value_types(node: NodeInfo) -> None:
    """Raises `UnsupportedOpError` when an input or output is not a tensor torch can hold."""
    for kind, values in (("input", node.node.inputs), ("output", node.node.outputs)):
        for index, value in enumerate(values):
            if value is None or value.type is None:
                continue
            if not isinstance(value.type, ir.TensorType):
                raise node.unsupported(
                    f"{kind} {index} is a {type(value.type).__name__}; "
                    "the reference runtime only runs on plain tensors"
                )
            check_dtype(node, value.dtype, f"{kind} {index}")


def check_dtype(node: NodeInfo, dtype: ir.DataType | None, what: str) -> None:
    """Raises `UnsupportedOpError` for a dtype torch has no representation of."""
    if dtype is not None and dtype not in ONNX_TO_TORCH:
        raise node.unsupported(f"{what} has dtype {dtype.name}, which torch cannot represent")


def onnx_dtype_attr(node: NodeInfo, name: str, default: int | None = None) -> ir.DataType | None:
    """An attribute holding an ONNX dtype enum, checked to be one torch can hold."""
    value = node.attr(name, default)
    if not value:  # absent, or 0 (UNDEFINED): the op's default applies
        return None
    try:
        dtype = ir.DataType(value)
    except ValueError:
        raise node.unsupported(f"attribute '{name}' = {value} is not a known dtype") from None
    check_dtype(node, dtype, f"attribute '{name}'")
    return dtype


def const_input(node: NodeInfo, index: int) -> torch.Tensor | None:
    """The value of input ``index`` when it is known at build time (an initializer)."""
    if index >= node.num_inputs or node.node.inputs[index] is None:
        return None
    value = node.node.inputs[index]
    if value.const_value is None:
        return None
    return to_torch(value.const_value)


def has_input(node: NodeInfo, index: int) -> bool:
    """Whether the optional input ``index`` is given (present and not an empty name)."""
    return index < node.num_inputs and node.node.inputs[index] is not None


def norm_axis(axis: int, rank: int) -> int:
    """A non-negative axis; accepts [-rank, rank-1]."""
    if not -rank <= axis < max(rank, 1):
        raise IndexError(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def int_list(values: torch.Tensor | Sequence[int]) -> list[int]:
    """A 1-D int tensor (e.g. a shape or axes input) as a list of Python ints."""
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.reshape(-1).tolist()]
    return [int(v) for v in values]


# --- unsigned integers ------------------------------------------------------------------------
# uint16/uint32 fit in int64, so any op can run there and cast back exactly. uint64 does not:
# add/sub/mul wrap identically in two's complement, so they run on the int64 bit pattern; order
# comparisons run on the pattern with its sign bit flipped (which maps unsigned order to signed).


def ordered64(x: torch.Tensor) -> torch.Tensor:
    """uint64 mapped to int64 so that signed order equals the unsigned order."""
    return x.view(torch.int64) ^ INT64_MIN


def unordered64(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `ordered64`."""
    return (x ^ INT64_MIN).view(torch.uint64)


def udivmod64(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned 64-bit quotient and remainder on int64 bit patterns (results are bit patterns)."""
    a, b = torch.broadcast_tensors(a, b)
    big_divisor = b < 0  # b >= 2**63: the quotient is 0 or 1
    # Halve the dividend (logical shift), divide, double, then fix up by at most one.
    half = (a >> 1) & (2**63 - 1)
    safe_b = torch.where(big_divisor, torch.ones_like(b), b)
    q = torch.div(half, safe_b, rounding_mode="trunc") << 1
    r = a - q * safe_b
    fix = (r ^ INT64_MIN) >= (safe_b ^ INT64_MIN)
    q = q + fix.to(q.dtype)
    r = r - torch.where(fix, safe_b, torch.zeros_like(r))
    ge = (a ^ INT64_MIN) >= (b ^ INT64_MIN)
    q = torch.where(big_divisor, ge.to(q.dtype), q)
    r = torch.where(big_divisor, torch.where(ge, a - b, a), r)
    return q, r


def int64_compute(x: torch.Tensor) -> torch.Tensor:
    """Widens uint16/uint32 to int64 (exact) for ops torch lacks on them; others unchanged."""
    return x.to(torch.int64) if x.dtype in WIDE_UNSIGNED else x


# Data-movement kernels (gather, index_select, tril, ...) are missing for these dtypes; moving the
# same-width signed integers instead moves the exact same bits.
_RAW_VIEW = {
    torch.uint16: torch.int16,
    torch.uint32: torch.int32,
    torch.uint64: torch.int64,
    torch.float8_e4m3fn: torch.int8,
    torch.float8_e4m3fnuz: torch.int8,
    torch.float8_e5m2: torch.int8,
    torch.float8_e5m2fnuz: torch.int8,
}


def raw(x: torch.Tensor) -> torch.Tensor:
    """``x``'s bits as a dtype every torch data-movement kernel supports."""
    target = _RAW_VIEW.get(x.dtype)
    return x if target is None else x.view(target)


def unraw(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `raw`."""
    return y if y.dtype == dtype else y.view(dtype)


def moves_data(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Runs a kernel that only moves its first input's elements on `raw` bits."""

    def run(x: torch.Tensor, *rest: torch.Tensor | None) -> torch.Tensor:
        return unraw(kernel(raw(x), *rest), x.dtype)

    return run
