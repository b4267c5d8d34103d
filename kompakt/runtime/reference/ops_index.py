"""Indexing ops: Gather*, Scatter*, OneHot, NonZero, Compress, Trilu, Pad, CenterCropPad and
ReverseSequence.

Negative indices count from the end of their axis in every op that accepts them. These ops only
move elements, so they run on `raw` bits for the dtypes torch's indexing kernels lack (uint16/32/64,
float8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kompakt.runtime.reference._common import int_list, moves_data, norm_axis, op, raw, unraw
from kompakt.runtime.reference.registry import Kernel, NodeInfo


def _wrap(indices: torch.Tensor, size: int | torch.Tensor) -> torch.Tensor:
    indices = indices.to(torch.int64)
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def gather(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 0)

    def kernel(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        picked = x.index_select(a, _wrap(indices, x.shape[a]).reshape(-1))
        return picked.reshape(x.shape[:a] + indices.shape + x.shape[a + 1 :])

    return moves_data(kernel)


@op("GatherElements")
def gather_elements(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 0)

    def kernel(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        return torch.gather(x, a, _wrap(indices, x.shape[a]))

    return moves_data(kernel)


def _nd_index(data_shape: torch.Size, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The last axis of ``indices`` as one index tensor per leading data axis, wrapped."""
    return tuple(_wrap(i, size) for i, size in zip(indices.unbind(-1), data_shape, strict=False))


@op("GatherND")
def gather_nd(node: NodeInfo) -> Kernel:
    batch_dims = node.attr("batch_dims", 0)

    def kernel(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        batch = x.shape[:batch_dims]
        flat_x = x.reshape(math.prod(batch), *x.shape[batch_dims:])
        flat_i = indices.reshape(math.prod(batch), -1, indices.shape[-1])
        rows = torch.arange(flat_x.shape[0], device=x.device)[:, None]
        out = flat_x[(rows, *_nd_index(flat_x.shape[1:], flat_i))]
        depth = indices.shape[-1]
        return out.reshape(indices.shape[:-1] + x.shape[batch_dims + depth :])

    return moves_data(kernel)


_REDUCTIONS = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _reduction(node: NodeInfo) -> str:
    reduction = node.attr("reduction", "none")
    if reduction != "none" and reduction not in _REDUCTIONS:
        raise node.unsupported(f"reduction '{reduction}'")
    return reduction


@op("ScatterND")
def scatter_nd(node: NodeInfo) -> Kernel:
    reduction = _reduction(node)

    def kernel(x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        depth = indices.shape[-1]
        # Linearize the first `depth` axes so that every update addresses one row.
        rows = x.reshape(math.prod(x.shape[:depth]), *x.shape[depth:]).clone()
        flat_i = indices.reshape(-1, depth)
        linear = sum(
            i * math.prod(x.shape[k + 1 : depth]) for k, i in enumerate(_nd_index(x.shape, flat_i))
        )
        flat_u = (raw(updates) if reduction == "none" else updates).reshape(-1, *x.shape[depth:])
        if reduction == "none":
            rows.index_copy_(0, linear, flat_u)
        else:
            index = linear.reshape((-1,) + (1,) * (flat_u.dim() - 1)).expand_as(flat_u)
            rows.scatter_reduce_(0, index, flat_u, _REDUCTIONS[reduction], include_self=True)
        return rows.reshape(x.shape)

    return kernel if reduction != "none" else moves_data(kernel)


def scatter_nd_in_place(x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor):
    """ScatterND without reduction, written into ``x`` (returned): for a run allowed to overwrite
    ``x`` (kompakt.runtime.in_place), a KV cache's per-token write in a decode step.

    ``index_put_`` takes the indices as they are: it wraps negative ones and rejects those out of
    range itself, so this is one launch on a GPU (it runs twice per layer per token), where
    `_wrap`'s compare, add and select would be three more."""
    depth = indices.shape[-1]
    flat = indices.reshape(-1, depth).to(torch.int64)
    index = tuple(flat[:, k] for k in range(depth))
    raw(x).index_put_(index, raw(updates).reshape(-1, *x.shape[depth:]))
    return x


def _scatter_elements(axis: int, reduction: str) -> Kernel:
    def kernel(x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        a = norm_axis(axis, x.dim())
        index = _wrap(indices, x.shape[a])
        if reduction == "none":
            return unraw(torch.scatter(raw(x), a, index, raw(updates)), x.dtype)
        return torch.scatter_reduce(x, a, index, updates, _REDUCTIONS[reduction])

    return kernel


@op("ScatterElements")
def scatter_elements(node: NodeInfo) -> Kernel:
    return _scatter_elements(node.attr("axis", 0), _reduction(node))


@op("Scatter")
def scatter(node: NodeInfo) -> Kernel:
    # Deprecated in opset 11 in favour of ScatterElements, which has the same semantics.
    return _scatter_elements(node.attr("axis", 0), "none")


@op("OneHot")
def one_hot(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", -1)

    def kernel(indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        n = int(depth.reshape(-1)[0].item())
        a = norm_axis(axis, indices.dim() + 1)
        shape = [1] * (indices.dim() + 1)
        shape[a] = n
        classes = torch.arange(n, device=indices.device).reshape(shape)
        # Indices outside [-depth, depth-1] match no class and give an all-off row.
        hot = _wrap(indices, n).unsqueeze(a) == classes
        off, on = values.reshape(-1)[0], values.reshape(-1)[1]
        return torch.where(hot, on, off)

    return kernel


@op("NonZero")
def non_zero(node: NodeInfo) -> Kernel:
    return lambda x: torch.nonzero(x.reshape(1) if x.dim() == 0 else x).T.contiguous()


@op("Compress")
def compress(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", None)

    def kernel(x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        chosen = torch.nonzero(condition.reshape(-1)).reshape(-1)
        if axis is None:
            return x.reshape(-1).index_select(0, chosen)
        return x.index_select(norm_axis(axis, x.dim()), chosen)

    return moves_data(kernel)


@op("Trilu")
def trilu(node: NodeInfo) -> Kernel:
    upper = bool(node.attr("upper", 1))

    def kernel(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        diagonal = 0 if k is None else int(k.item())
        return torch.triu(x, diagonal) if upper else torch.tril(x, diagonal)

    return moves_data(kernel)


def _pad_indices(mode: str, size: int, begin: int, end: int, device: torch.device) -> torch.Tensor:
    position = torch.arange(-begin, size + end, device=device)
    if mode == "edge":
        return position.clamp(0, size - 1)
    if mode == "wrap":
        return position.remainder(size)
    period = 2 * (size - 1)  # reflect: mirror on the first and last elements
    if period == 0:
        return torch.zeros_like(position)
    folded = position.remainder(period)
    return torch.where(folded < size, folded, period - folded)


def _pad(
    x: torch.Tensor, pads: list[int], mode: str, value: torch.Tensor | None, axes: list[int] | None
) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [norm_axis(a, rank) for a in axes]
    begins, ends = pads[: len(axes)], pads[len(axes) :]
    if mode == "constant":
        flat = [0] * (2 * rank)  # torch lists (begin, end) from the last axis backwards
        for a, b, e in zip(axes, begins, ends, strict=True):
            flat[2 * (rank - 1 - a)], flat[2 * (rank - 1 - a) + 1] = b, e
        fill = 0 if value is None or value.numel() == 0 else value.reshape(-1)[0].item()
        return F.pad(x, flat, value=fill)  # negative pads crop
    out = raw(x)
    for a, b, e in zip(axes, begins, ends, strict=True):
        if b or e:
            out = out.index_select(a, _pad_indices(mode, out.shape[a], b, e, x.device))
    return unraw(out, x.dtype)


@op("Pad")
def pad(node: NodeInfo) -> Kernel:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.unsupported(f"mode '{mode}'")
    if node.opset < 11:  # pads and value were attributes
        pads = node.attr("pads", None) or node.attr("paddings")
        value = torch.tensor(node.attr("value", 0.0))
        return lambda x: _pad(x, pads, mode, value, None)

    def kernel(x, pads, value=None, axes=None) -> torch.Tensor:
        return _pad(x, int_list(pads), mode, value, None if axes is None else int_list(axes))

    return kernel


@op("CenterCropPad")
def center_crop_pad(node: NodeInfo) -> Kernel:
    axes_attr = node.attr("axes", None)

    def kernel(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        axes = range(x.dim()) if axes_attr is None else axes_attr
        axes = [norm_axis(a, x.dim()) for a in axes]
        sizes = int_list(target)
        # Centered; an odd excess goes to the end. Negative pads crop.
        begins = [
            (t - x.shape[a]) // 2 if t >= x.shape[a] else -((x.shape[a] - t) // 2)
            for a, t in zip(axes, sizes, strict=True)
        ]
        ends = [t - x.shape[a] - b for a, t, b in zip(axes, sizes, begins, strict=True)]
        return _pad(x, begins + ends, "constant", None, axes)

    return kernel


@op("ReverseSequence")
def reverse_sequence(node: NodeInfo) -> Kernel:
    batch_axis = node.attr("batch_axis", 1)
    time_axis = node.attr("time_axis", 0)

    def kernel(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        moved = x.movedim((time_axis, batch_axis), (0, 1))  # [time, batch, ...]
        steps = torch.arange(moved.shape[0], device=x.device)[:, None]
        lengths = lengths.to(torch.int64)[None, :]
        source = torch.where(steps < lengths, lengths - 1 - steps, steps)
        index = source.reshape(source.shape + (1,) * (moved.dim() - 2)).expand_as(moved)
        return torch.gather(moved, 0, index).movedim((0, 1), (time_axis, batch_axis))

    return moves_data(kernel)
