"""Elementwise ops: unary math, arithmetic, comparisons, logic, bitwise ops, Where and Clip.

Every binary op broadcasts NumPy-style (torch's broadcasting is the same) and, as ONNX requires
both operands to share a dtype, never promotes. torch lacks most kernels for uint16/uint32/uint64:
uint16/uint32 run exactly in int64 and are cast back; uint64 runs on its int64 bit pattern
(wrap-around arithmetic is identical; order comparisons flip the sign bit; division is done
unsigned by `udivmod64`). Activations live in `ops_activation`, Cast/CastLike in `ops_cast`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from kompakt.runtime.reference import ops_activation, ops_cast  # noqa: F401  (registration)
from kompakt.runtime.reference._common import (
    WIDE_UNSIGNED,
    int64_compute,
    op,
    ordered64,
    raw,
    udivmod64,
    unordered64,
    unraw,
)
from kompakt.runtime.reference.registry import Kernel, NodeInfo

Binary = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# --- unary ------------------------------------------------------------------------------------

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Asin": torch.asin,
    "Acos": torch.acos,
    "Atan": torch.atan,
    "Sinh": torch.sinh,
    "Cosh": torch.cosh,
    "Asinh": torch.asinh,
    "Acosh": torch.acosh,
    "Atanh": torch.atanh,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # ties to even, as ONNX specifies
    "IsNaN": torch.isnan,
    "Not": torch.logical_not,
}


@op(*_UNARY)
def unary(node: NodeInfo) -> Kernel:
    return _UNARY[node.op_type]


_UNSIGNED = (torch.uint8, torch.uint16, torch.uint32, torch.uint64)


@op("Abs")
def abs_(node: NodeInfo) -> Kernel:
    return lambda x: x if x.dtype in _UNSIGNED else torch.abs(x)


@op("Neg")
def neg(node: NodeInfo) -> Kernel:
    return torch.neg


@op("Sign")
def sign(node: NodeInfo) -> Kernel:
    def kernel(x: torch.Tensor) -> torch.Tensor:
        if x.dtype in _UNSIGNED:
            return (x != 0).to(x.dtype)
        return torch.sign(x)

    return kernel


@op("IsInf")
def is_inf(node: NodeInfo) -> Kernel:
    negative = bool(node.attr("detect_negative", 1))
    positive = bool(node.attr("detect_positive", 1))

    def kernel(x: torch.Tensor) -> torch.Tensor:
        if negative and positive:
            return torch.isinf(x)
        if positive:
            return torch.isposinf(x)
        if negative:
            return torch.isneginf(x)
        return torch.zeros_like(x, dtype=torch.bool)

    return kernel


# --- arithmetic -------------------------------------------------------------------------------


def _wrapping(fn: Binary) -> Binary:
    """An op whose integer result wraps modulo 2**bits (add, sub, mul, bitwise ops)."""

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in WIDE_UNSIGNED:
            return fn(a.to(torch.int64), b.to(torch.int64)).to(a.dtype)
        if a.dtype == torch.uint64:
            return fn(a.view(torch.int64), b.view(torch.int64)).view(torch.uint64)
        return fn(a, b)

    return kernel


_ARITH: dict[str, Binary] = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}


@op(*_ARITH)
def arith(node: NodeInfo) -> Kernel:
    return _wrapping(_ARITH[node.op_type])


@op("Div")
def div(node: NodeInfo) -> Kernel:
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.is_floating_point():
            return torch.div(a, b)
        # Integer division truncates toward zero in ONNX (like C), not floor like Python.
        if a.dtype == torch.uint64:
            return udivmod64(a.view(torch.int64), b.view(torch.int64))[0].view(torch.uint64)
        wide = a.dtype in WIDE_UNSIGNED
        q = torch.div(int64_compute(a), int64_compute(b), rounding_mode="trunc")
        return q.to(a.dtype) if wide else q

    return kernel


@op("Mod")
def mod(node: NodeInfo) -> Kernel:
    fmod = bool(node.attr("fmod", 0))

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype == torch.uint64:  # both conventions agree on unsigned values
            return udivmod64(a.view(torch.int64), b.view(torch.int64))[1].view(torch.uint64)
        wide = a.dtype in WIDE_UNSIGNED
        x, y = int64_compute(a), int64_compute(b)
        if fmod:  # C fmod: the sign of the dividend
            r = torch.fmod(x, y)
        else:  # floor mod: the sign of the divisor
            r = torch.remainder(x, y)
            if r.is_floating_point():  # a zero result takes the divisor's sign (opset 28)
                r = torch.where(r == 0, torch.copysign(r, y), r)
        return r.to(a.dtype) if wide else r

    return kernel


@op("Pow")
def pow_(node: NodeInfo) -> Kernel:
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # The result has the base's type; the exponent may be any numeric type.
        if a.is_floating_point():
            return torch.pow(a, b if b.dtype in (a.dtype, torch.int64) else b.to(a.dtype))
        if b.is_floating_point():
            return torch.pow(a.to(torch.float64), b.to(torch.float64)).to(a.dtype)
        return torch.pow(a.to(torch.int64), b.to(torch.int64)).to(a.dtype)

    return kernel


# --- variadic ---------------------------------------------------------------------------------


def _fold(fn: Binary, ordered: bool) -> Kernel:
    def kernel(*xs: torch.Tensor) -> torch.Tensor:
        dtype = xs[0].dtype
        if dtype in WIDE_UNSIGNED:
            return functools.reduce(fn, [x.to(torch.int64) for x in xs]).to(dtype)
        if dtype == torch.uint64:
            if ordered:
                return unordered64(functools.reduce(fn, [ordered64(x) for x in xs]))
            return functools.reduce(fn, [x.view(torch.int64) for x in xs]).view(dtype)
        return functools.reduce(fn, xs)

    return kernel


@op("Max")
def max_(node: NodeInfo) -> Kernel:
    return _fold(torch.maximum, ordered=True)


@op("Min")
def min_(node: NodeInfo) -> Kernel:
    return _fold(torch.minimum, ordered=True)


@op("Sum")
def sum_(node: NodeInfo) -> Kernel:
    return _fold(torch.add, ordered=False)


@op("Mean")
def mean(node: NodeInfo) -> Kernel:
    total = _fold(torch.add, ordered=False)
    return lambda *xs: total(*xs) / len(xs)


# --- comparisons and logic --------------------------------------------------------------------


def _comparison(fn: Binary) -> Binary:
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in WIDE_UNSIGNED:
            a, b = a.to(torch.int64), b.to(torch.int64)
        elif a.dtype == torch.uint64:
            a, b = ordered64(a), ordered64(b)
        return fn(a, b)

    return kernel


_COMPARISONS: dict[str, Binary] = {
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
}


@op(*_COMPARISONS)
def comparison(node: NodeInfo) -> Kernel:
    return _comparison(_COMPARISONS[node.op_type])


_LOGIC: dict[str, Binary] = {
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}


@op(*_LOGIC)
def logic(node: NodeInfo) -> Kernel:
    return _LOGIC[node.op_type]


# --- bitwise ----------------------------------------------------------------------------------

_BITWISE: dict[str, Binary] = {
    "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or,
    "BitwiseXor": torch.bitwise_xor,
}


@op(*_BITWISE)
def bitwise(node: NodeInfo) -> Kernel:
    fn = _BITWISE[node.op_type]
    # Bitwise results do not depend on signedness: run on same-width signed bits.
    return lambda a, b: unraw(fn(raw(a), raw(b)), a.dtype)


@op("BitwiseNot")
def bitwise_not(node: NodeInfo) -> Kernel:
    return lambda x: unraw(torch.bitwise_not(raw(x)), x.dtype)


_BITS = {
    torch.uint8: 8,
    torch.int8: 8,
    torch.uint16: 16,
    torch.int16: 16,
    torch.uint32: 32,
    torch.int32: 32,
    torch.uint64: 64,
    torch.int64: 64,
}


@op("BitShift")
def bit_shift(node: NodeInfo) -> Kernel:
    direction = node.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise node.unsupported(f"direction '{direction}'")
    left = direction == "LEFT"

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        bits = _BITS[dtype]
        # int64 holds every type but uint64, whose bit pattern is used instead.
        xs = x.view(torch.int64) if dtype == torch.uint64 else x.to(torch.int64)
        ys = y.view(torch.int64) if y.dtype == torch.uint64 else y.to(torch.int64)
        # Opset 28: a negative shift or one >= the width leaves only the sign fill.
        valid = (ys >= 0) & (ys < bits)
        s = torch.where(valid, ys, torch.zeros_like(ys))
        if left:
            out = torch.where(valid, xs << s, torch.zeros_like(xs))
        else:
            shifted = xs >> s  # arithmetic shift: right for every widened or signed value
            if dtype == torch.uint64:  # make it logical on the raw bits
                mask = torch.iinfo(torch.int64).max >> (s - 1).clamp(min=0)
                shifted = torch.where(s == 0, xs, shifted & mask)
            fill = torch.where(xs < 0, -1, 0) if dtype.is_signed else torch.zeros_like(xs)
            out = torch.where(valid, shifted, fill)
        return out.view(torch.uint64) if dtype == torch.uint64 else out.to(dtype)

    return kernel


# --- selection --------------------------------------------------------------------------------


@op("Where")
def where(node: NodeInfo) -> Kernel:
    return torch.where


@op("Clip")
def clip(node: NodeInfo) -> Kernel:
    if node.opset < 11:  # bounds were float attributes before opset 11
        lo = node.attr("min", -math.inf)
        hi = node.attr("max", math.inf)
        return lambda x: torch.clamp(x, lo, hi)

    def kernel(
        x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
    ) -> torch.Tensor:
        if lo is None and hi is None:
            return x
        if x.dtype == torch.uint64:
            lo = None if lo is None else ordered64(lo)
            hi = None if hi is None else ordered64(hi)
            return unordered64(torch.clamp(ordered64(x), lo, hi))
        wide = x.dtype in WIDE_UNSIGNED
        lo = None if lo is None else int64_compute(lo)
        hi = None if hi is None else int64_compute(hi)
        # torch.clamp sets everything to max when min > max, as ONNX specifies.
        out = torch.clamp(int64_compute(x), lo, hi)
        return out.to(x.dtype) if wide else out

    return kernel
