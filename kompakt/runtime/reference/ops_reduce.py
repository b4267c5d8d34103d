"""Reductions: ReduceSum/Mean/Max/Min/Prod/L1/L2/LogSum/LogSumExp/SumSquare.

The axes moved from an attribute to an optional input in opset 13 for ReduceSum and in opset 18
for the others; ``noop_with_empty_axes`` came with the input. With no axes the reduction is over
all axes, unless ``noop_with_empty_axes`` is set: then it is over none, and only the composite
steps remain (ReduceSumSquare squares, ReduceLogSum takes the log, ReduceL2 gives ``|x|``).
Reducing an empty set gives the identity of the reduction (0, 1, -inf, +inf, or the dtype's
extreme for integers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kompakt.runtime.reference._common import (
    WIDE_UNSIGNED,
    int_list,
    norm_axis,
    op,
    ordered64,
    unordered64,
)
from kompakt.runtime.reference.registry import Kernel, NodeInfo

Dims = tuple[int, ...]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
    # torch widens integer sums to int64; ONNX keeps the input's type.
    return torch.sum(x, dims, keepdim=keepdim, dtype=x.dtype)


def _mean(x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
    if x.is_floating_point():
        return torch.mean(x, dims, keepdim=keepdim)
    count = math.prod(x.shape[d] for d in dims)
    total = torch.sum(x, dims, keepdim=keepdim, dtype=torch.float64)
    return (total / count).to(x.dtype)


def _prod(x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
    # torch.prod reduces one dim at a time; move the reduced axes last and flatten them.
    kept = [d for d in range(x.dim()) if d not in dims]
    flat = x.permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)
    out = torch.prod(flat, -1, dtype=x.dtype)
    if keepdim:
        out = out.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return out


def _extreme(largest: bool) -> Callable[[torch.Tensor, Dims, bool], torch.Tensor]:
    def reduce(x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
        if x.dtype == torch.bool:  # False < True: max is any, min is all
            fn = torch.any if largest else torch.all
            return fn(x, dim=dims, keepdim=keepdim) if dims else x
        if any(x.shape[d] == 0 for d in dims):  # torch refuses; ONNX gives the identity
            shape = [1 if d in dims else n for d, n in enumerate(x.shape)]
            if not keepdim:
                shape = [n for d, n in enumerate(x.shape) if d not in dims]
            info = torch.finfo(x.dtype) if x.is_floating_point() else torch.iinfo(x.dtype)
            fill = (-math.inf if largest else math.inf) if x.is_floating_point() else None
            if fill is None:
                fill = info.min if largest else info.max
            return torch.full(shape, fill, dtype=x.dtype, device=x.device)
        fn = torch.amax if largest else torch.amin
        if x.dtype in WIDE_UNSIGNED:
            return fn(x.to(torch.int64), dims, keepdim=keepdim).to(x.dtype)
        if x.dtype == torch.uint64:
            return unordered64(fn(ordered64(x), dims, keepdim=keepdim))
        return fn(x, dims, keepdim=keepdim)

    return reduce


def _log_sum_exp(x: torch.Tensor, dims: Dims, keepdim: bool) -> torch.Tensor:
    return torch.logsumexp(x, dims, keepdim=keepdim)


@dataclass(frozen=True)
class _Reduction:
    core: Callable[[torch.Tensor, Dims, bool], torch.Tensor]
    pre: Callable[[torch.Tensor], torch.Tensor] = _identity
    post: Callable[[torch.Tensor], torch.Tensor] = _identity
    axes_input_since: int = 18


_REDUCTIONS = {
    "ReduceSum": _Reduction(_sum, axes_input_since=13),
    "ReduceMean": _Reduction(_mean),
    "ReduceMax": _Reduction(_extreme(largest=True)),
    "ReduceMin": _Reduction(_extreme(largest=False)),
    "ReduceProd": _Reduction(_prod),
    "ReduceL1": _Reduction(_sum, pre=torch.abs),
    "ReduceL2": _Reduction(_sum, pre=torch.square, post=torch.sqrt),
    "ReduceLogSum": _Reduction(_sum, post=torch.log),
    "ReduceLogSumExp": _Reduction(_log_sum_exp),
    "ReduceSumSquare": _Reduction(_sum, pre=torch.square),
}


@op(*_REDUCTIONS)
def reduce(node: NodeInfo) -> Kernel:
    spec = _REDUCTIONS[node.op_type]
    keepdims = bool(node.attr("keepdims", 1))
    noop = bool(node.attr("noop_with_empty_axes", 0))
    axes_attr = node.attr("axes", None) if node.opset < spec.axes_input_since else None

    def kernel(x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        listed = axes_attr if axes is None else int_list(axes)
        if not listed and noop:
            # Over an empty set of axes only the composite steps remain; a reduction over a
            # single element is the element itself (log(exp(x)) == x for LogSumExp).
            return x if spec.core is _log_sum_exp else spec.post(spec.pre(x))
        rank = x.dim()
        dims = tuple(sorted({norm_axis(a, rank) for a in listed})) if listed else tuple(range(rank))
        return spec.post(spec.core(spec.pre(x), dims, keepdims))

    return kernel
