"""Neural-network ops: MatMul, Gemm, Einsum, Det, the Softmax family, CumSum/CumProd,
ArgMax/ArgMin, TopK, global pooling and RotaryEmbedding.

Normalization layers live in `ops_norm`. Softmax, LogSoftmax and Hardmax changed meaning in
opset 13: before it they flatten the input to 2-D at ``axis`` (default 1) and normalize each
row; from 13 they normalize along ``axis`` (default -1) alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kompakt.runtime.reference import ops_norm  # noqa: F401  (registration)
from kompakt.runtime.reference._common import (
    WIDE_UNSIGNED,
    int64_compute,
    norm_axis,
    op,
    ordered64,
)
from kompakt.runtime.reference.registry import Kernel, NodeInfo


def _integer_safe(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Runs ``fn`` on int64 for the unsigned types torch lacks kernels for (wrapping result)."""

    def kernel(*xs: torch.Tensor) -> torch.Tensor:
        dtype = xs[0].dtype
        if dtype in WIDE_UNSIGNED:
            return fn(*(x.to(torch.int64) for x in xs)).to(dtype)
        if dtype == torch.uint64:
            return fn(*(x.view(torch.int64) for x in xs)).view(dtype)
        return fn(*xs)

    return kernel


@op("MatMul")
def matmul(node: NodeInfo) -> Kernel:
    return _integer_safe(torch.matmul)


@op("Gemm")
def gemm(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    beta = node.attr("beta", 1.0)
    trans_a = bool(node.attr("transA", 0))
    trans_b = bool(node.attr("transB", 0))

    def kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.matmul(a.T if trans_a else a, b.T if trans_b else b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None:  # C broadcasts unidirectionally to [M, N]
            y = y + (c * beta if beta != 1.0 else c)
        return y.to(a.dtype)

    return _integer_safe(kernel)


@op("Einsum")
def einsum(node: NodeInfo) -> Kernel:
    equation = node.attr("equation").replace(" ", "")
    return _integer_safe(lambda *xs: torch.einsum(equation, *xs))


def _normalizer(node: NodeInfo, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> Kernel:
    if node.opset < 13:
        axis = node.attr("axis", 1)

        def flattened(x: torch.Tensor) -> torch.Tensor:
            a = norm_axis(axis, x.dim())
            return fn(x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:])), 1).reshape(x.shape)

        return flattened
    axis = node.attr("axis", -1)
    return lambda x: fn(x, norm_axis(axis, x.dim()))


_HALF = (torch.float16, torch.bfloat16)


def _bf16_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum along ``dim`` rounded to bfloat16 after every addition, left to right.

    This is how ONNX's reference implementation (numpy with ml_dtypes) sums bfloat16, and the
    conformance data for bfloat16 Softmax is bit-exact to it (its rtol is below bfloat16's
    epsilon). It takes one step per element of ``dim``.
    """
    total = x.narrow(dim, 0, 1)
    for i in range(1, x.shape[dim]):
        total = total + x.narrow(dim, i, 1)
    return total


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dtype in _HALF and x.shape[dim] > 0:
        # ONNX defines Softmax by its function body, Exp(x - ReduceMax) / ReduceSum, in the
        # input type; torch.softmax computes in float32 and rounds once, an ulp away.
        e = torch.exp(x - x.amax(dim, keepdim=True))
        total = _bf16_sum(e, dim) if x.dtype == torch.bfloat16 else e.sum(dim, keepdim=True)
        return e / total
    return torch.softmax(x, dim)


def _log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dtype in _HALF and x.shape[dim] > 0:
        # The function body step by step, like _softmax, but with the float32-accumulated sum
        # (LogSoftmax often runs over a whole vocabulary, too long for _bf16_sum).
        shifted = x - x.amax(dim, keepdim=True)
        return shifted - torch.log(torch.exp(shifted).sum(dim, keepdim=True))
    return torch.log_softmax(x, dim)


@op("Softmax")
def softmax(node: NodeInfo) -> Kernel:
    return _normalizer(node, _softmax)


@op("LogSoftmax")
def log_softmax(node: NodeInfo) -> Kernel:
    return _normalizer(node, _log_softmax)


def _hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    first_max = x.argmax(dim, keepdim=True)  # ties: the first occurrence wins
    return torch.zeros_like(x).scatter(dim, first_max, 1)


@op("Hardmax")
def hardmax(node: NodeInfo) -> Kernel:
    return _normalizer(node, _hardmax)


def _shift_in(s: torch.Tensor, axis: int, identity: int) -> torch.Tensor:
    """``s`` moved one step along ``axis``, the first slot filled with ``identity``."""
    head = torch.full_like(s.narrow(axis, 0, min(1, s.shape[axis])), identity)
    return torch.cat([head, s.narrow(axis, 0, max(s.shape[axis] - 1, 0))], axis)


def _cumulative(node: NodeInfo, fn: Callable[..., torch.Tensor], identity: int) -> Kernel:
    exclusive = bool(node.attr("exclusive", 0))
    reverse = bool(node.attr("reverse", 0))

    def kernel(x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
        a = norm_axis(int(axis.item()), x.dim())
        y = x.flip(a) if reverse else x
        s = fn(y, a, dtype=y.dtype)  # torch would widen int32 to int64 by default
        if exclusive:
            s = _shift_in(s, a, identity)
        return s.flip(a) if reverse else s

    return _integer_safe(kernel)


@op("CumSum")
def cum_sum(node: NodeInfo) -> Kernel:
    return _cumulative(node, torch.cumsum, 0)


@op("CumProd")
def cum_prod(node: NodeInfo) -> Kernel:
    return _cumulative(node, torch.cumprod, 1)


def _arg(node: NodeInfo, fn: Callable[..., torch.Tensor]) -> Kernel:
    axis = node.attr("axis", 0)
    keepdims = bool(node.attr("keepdims", 1))
    last = bool(node.attr("select_last_index", 0))

    def kernel(x: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        if x.dtype == torch.uint64:
            x = ordered64(x)
        elif x.dtype == torch.bool:
            x = x.to(torch.uint8)
        else:
            x = int64_compute(x)
        if last:  # search the reversed axis, then map the position back
            return x.shape[a] - 1 - fn(x.flip(a), a, keepdim=keepdims)
        return fn(x, a, keepdim=keepdims)

    return kernel


@op("ArgMax")
def arg_max(node: NodeInfo) -> Kernel:
    return _arg(node, torch.argmax)


@op("ArgMin")
def arg_min(node: NodeInfo) -> Kernel:
    return _arg(node, torch.argmin)


@op("TopK")
def top_k(node: NodeInfo) -> Kernel:
    k_attr = node.attr("k") if node.opset < 10 else None  # k became an input in opset 10
    axis = node.attr("axis", -1)
    largest = bool(node.attr("largest", 1))

    def kernel(x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        count = k_attr if k is None else int(k.reshape(-1)[0].item())
        a = norm_axis(axis, x.dim())
        # A stable sort keeps equal values in index order: ties go to the lower index.
        values, indices = torch.sort(x, dim=a, descending=largest, stable=True)
        return values.narrow(a, 0, count), indices.narrow(a, 0, count)

    return kernel


@op("GlobalAveragePool")
def global_average_pool(node: NodeInfo) -> Kernel:
    return lambda x: x.mean(tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(node: NodeInfo) -> Kernel:
    return lambda x: x.amax(tuple(range(2, x.dim())), keepdim=True)


@op("RotaryEmbedding")
def rotary_embedding(node: NodeInfo) -> Kernel:
    interleaved = bool(node.attr("interleaved", 0))
    rotary_dim = node.attr("rotary_embedding_dim", 0)
    num_heads = node.attr("num_heads", 0)

    def kernel(x, cos, sin, position_ids=None) -> torch.Tensor:
        # Work on [batch, seq, heads, head_size], from [b, heads, s, d] or [b, s, heads * d].
        if x.dim() == 4:
            t = x.transpose(1, 2)
        else:
            t = x.reshape(x.shape[0], x.shape[1], num_heads, x.shape[2] // num_heads)
        dim = rotary_dim or t.shape[-1]
        rotated, kept = t[..., :dim], t[..., dim:]
        if position_ids is not None:  # caches indexed by position: [max_pos, dim / 2]
            cos, sin = cos[position_ids], sin[position_ids]
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        if interleaved:
            x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        else:
            x1, x2 = rotated.chunk(2, dim=-1)
        real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
        if interleaved:
            rotated = torch.stack([real, imag], dim=-1).reshape(rotated.shape)
        else:
            rotated = torch.cat([real, imag], dim=-1)
        out = torch.cat([rotated, kept], dim=-1)
        return out.transpose(1, 2) if x.dim() == 4 else out.reshape(x.shape)

    return kernel


@op("Det")
def det(node: NodeInfo) -> Kernel:
    return torch.linalg.det
