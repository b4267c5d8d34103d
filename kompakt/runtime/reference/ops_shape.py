"""Shape and layout ops: Shape, Reshape, Squeeze, Concat, Split, Slice, Expand, Transpose, ...

Several ops moved an attribute to an input over the opsets; the builder picks the form by
``node.opset``: Reshape's shape (input from opset 5), Slice's starts/ends/axes (inputs from 10,
with steps), Squeeze/Unsqueeze's axes and Split's split (inputs from 13; Split's num_outputs from
18). Shape values are read with ``.tolist()``, so they are taken from the tensor whatever its
device. Indexing ops (Gather*, Scatter*, Pad, Trilu, ...) live in `ops_index`.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import torch

from kompakt.runtime.reference import ops_index  # noqa: F401  (registration)
from kompakt.runtime.reference._common import (
    check_dtype,
    const_input,
    has_input,
    int_list,
    moves_data,
    norm_axis,
    op,
)
from kompakt.runtime.reference.registry import Kernel, NodeInfo


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _int64(values: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=like.device)


@op("Shape")
def shape(node: NodeInfo) -> Kernel:
    start = node.attr("start", 0)
    end = node.attr("end", None)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        rank = x.dim()
        s = _clamp(start + rank if start < 0 else start, 0, rank)
        e = rank if end is None else _clamp(end + rank if end < 0 else end, 0, rank)
        return _int64(list(x.shape[s:e]), x)

    return kernel


@op("Size")
def size(node: NodeInfo) -> Kernel:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@op("Identity")
def identity(node: NodeInfo) -> Kernel:
    return lambda x: x


def _reshape(x: torch.Tensor, spec: list[int], allowzero: bool) -> torch.Tensor:
    dims = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(spec)]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = x.numel() // known if known else 0
    return x.reshape(dims)


@op("Reshape")
def reshape(node: NodeInfo) -> Kernel:
    if node.opset < 5:  # the target shape was an attribute
        spec = node.attr("shape")
        return lambda x: _reshape(x, spec, False)
    allowzero = bool(node.attr("allowzero", 0))
    return lambda x, target: _reshape(x, int_list(target), allowzero)


@op("Flatten")
def flatten(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 1)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        a = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return kernel


def _squeeze(x: torch.Tensor, axes: list[int] | None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    dims = tuple(norm_axis(a, x.dim()) for a in axes)
    for d in dims:
        if x.shape[d] != 1:
            raise ValueError(f"cannot squeeze axis {d} of size {x.shape[d]}")
    return x.squeeze(dims) if dims else x


@op("Squeeze")
def squeeze(node: NodeInfo) -> Kernel:
    if node.opset < 13:
        axes = node.attr("axes", None)
        return lambda x: _squeeze(x, axes)
    return lambda x, axes=None: _squeeze(x, None if axes is None else int_list(axes))


def _unsqueeze(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    dims = list(x.shape)
    for a in sorted(norm_axis(a, rank) for a in axes):
        dims.insert(a, 1)
    return x.reshape(dims)


@op("Unsqueeze")
def unsqueeze(node: NodeInfo) -> Kernel:
    if node.opset < 13:
        axes = node.attr("axes")
        return lambda x: _unsqueeze(x, axes)
    return lambda x, axes: _unsqueeze(x, int_list(axes))


@op("Concat")
def concat(node: NodeInfo) -> Kernel:
    axis = node.attr("axis")
    return lambda *xs: torch.cat(xs, dim=norm_axis(axis, xs[0].dim()))


@op("Split")
def split(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", 0)
    count = node.num_outputs
    split_attr = node.attr("split", None) if node.opset < 13 else None
    num_outputs = node.attr("num_outputs", None) if node.opset >= 18 else None

    def kernel(x: torch.Tensor, sizes: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        a = norm_axis(axis, x.dim())
        dim = x.shape[a]
        if sizes is not None:
            parts = int_list(sizes)
        elif split_attr:
            parts = split_attr
        elif num_outputs is not None:  # opset 18: ceil-sized chunks, the last one smaller
            chunk = -(-dim // num_outputs)
            parts = [max(0, min(chunk, dim - i * chunk)) for i in range(num_outputs)]
        else:
            parts = [dim // count] * count
        return torch.split(x, parts, dim=a)

    return kernel


def _slice(
    x: torch.Tensor,
    starts: list[int],
    ends: list[int],
    axes: list[int] | None,
    steps: list[int] | None,
) -> torch.Tensor:
    rank = x.dim()
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index: list[slice] = [slice(None)] * rank
    backward: list[tuple[int, torch.Tensor]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(axis, rank)
        dim = x.shape[a]
        if step == 0:
            raise ValueError("Slice step cannot be 0")
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[a] = slice(_clamp(start, 0, dim), _clamp(end, 0, dim), step)
        else:  # torch slicing has no negative steps: gather the indices instead
            start, end = _clamp(start, 0, dim - 1), _clamp(end, -1, dim - 1)
            positions = torch.arange(start, end, step, device=x.device) if dim else None
            backward.append((a, positions if positions is not None else _int64([], x)))
    out = x[tuple(index)]
    for a, positions in backward:
        out = out.index_select(a, positions)
    return out


@op("Slice")
def slice_(node: NodeInfo) -> Kernel:
    if node.opset < 10:  # starts/ends/axes were attributes, and there were no steps
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes", None)
        return moves_data(lambda x: _slice(x, starts, ends, axes, None))

    def kernel(x, starts, ends, axes=None, steps=None) -> torch.Tensor:
        return _slice(
            x,
            int_list(starts),
            int_list(ends),
            None if axes is None else int_list(axes),
            None if steps is None else int_list(steps),
        )

    return moves_data(kernel)


@op("Expand")
def expand(node: NodeInfo) -> Kernel:
    def kernel(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Bidirectional: a 1 in the target keeps x's dimension.
        return x.expand(torch.broadcast_shapes(x.shape, tuple(int_list(target))))

    return kernel


@op("Transpose")
def transpose(node: NodeInfo) -> Kernel:
    perm = node.attr("perm", None)
    return lambda x: x.permute(perm if perm is not None else list(reversed(range(x.dim()))))


@op("Tile")
def tile(node: NodeInfo) -> Kernel:
    return lambda x, repeats: x.repeat(int_list(repeats)) if x.dim() else x.clone()


@op("Range")
def range_(node: NodeInfo) -> Kernel:
    def kernel(start: torch.Tensor, limit: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        s, e, d = start.item(), limit.item(), delta.item()
        if start.is_floating_point():
            # Computed in float64 and rounded once (opset 27's stash_type asks for at least
            # float32 accumulation for float16/bfloat16).
            n = max(math.ceil((e - s) / d), 0)
            steps = torch.arange(n, dtype=torch.float64, device=start.device)
            return (s + steps * d).to(start.dtype)
        n = max(-((s - e) // d), 0)  # exact ceil division of integers
        steps = torch.arange(n, dtype=torch.int64, device=start.device)
        return (s + steps * d).to(start.dtype)

    return kernel


def _tensor_attr(node: NodeInfo, name: str) -> torch.Tensor | None:
    attr = node.node.attributes.get(name)
    if attr is None:
        return None
    if attr.type != ir.AttributeType.TENSOR:
        raise node.unsupported(f"attribute '{name}' of type {attr.type.name}")
    check_dtype(node, attr.as_tensor().dtype, f"attribute '{name}'")
    return node.attr(name)


@op("Constant")
def constant(node: NodeInfo) -> Kernel:
    attrs = node.node.attributes
    if "value" in attrs:
        value = _tensor_attr(node, "value")
    elif "value_float" in attrs:
        value = torch.tensor(node.attr("value_float"), dtype=torch.float32)
    elif "value_floats" in attrs:
        value = torch.tensor(node.attr("value_floats"), dtype=torch.float32)
    elif "value_int" in attrs:
        value = torch.tensor(node.attr("value_int"), dtype=torch.int64)
    elif "value_ints" in attrs:
        value = torch.tensor(node.attr("value_ints"), dtype=torch.int64)
    else:
        names = ", ".join(attrs) or "none"
        raise node.unsupported(f"only numeric dense values are supported (attributes: {names})")
    return lambda: value


@op("ConstantOfShape")
def constant_of_shape(node: NodeInfo) -> Kernel:
    value = _tensor_attr(node, "value")
    fill = torch.zeros((), dtype=torch.float32) if value is None else value.reshape(())

    def kernel(target: torch.Tensor) -> torch.Tensor:
        return fill.to(target.device).expand(int_list(target)).contiguous()

    return kernel


@op("EyeLike")
def eye_like(node: NodeInfo) -> Kernel:
    dtype_attr = node.attr("dtype", None)
    k = node.attr("k", 0)
    dtype = node.output_dtype(0) if dtype_attr is not None else None

    def kernel(x: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        cols = torch.arange(x.shape[1], device=x.device)[None, :]
        return (cols - rows == k).to(dtype or x.dtype)

    return kernel


@op("Dropout")
def dropout(node: NodeInfo) -> Kernel:
    # Inference only: the output is the input and the mask is all ones. Training mode draws
    # random numbers, so it is rejected unless it is known at build time to be off.
    if node.opset < 7 and not node.attr("is_test", 0):
        raise node.unsupported("is_test=0 (training mode) is random")
    if node.opset >= 12 and has_input(node, 2):
        training = const_input(node, 2)
        if training is None or bool(training.reshape(-1)[0]):
            raise node.unsupported("training_mode may be true, which makes Dropout random")
    mask_dtype = node.output_dtype(1) if node.num_outputs > 1 else None

    def kernel(x: torch.Tensor, *_: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.ones_like(x, dtype=mask_dtype or torch.bool)

    return kernel


@op("DepthToSpace")
def depth_to_space(node: NodeInfo) -> Kernel:
    b = node.attr("blocksize")
    crd = node.attr("mode", "DCR") == "CRD"

    def kernel(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if crd:
            t = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            t = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        return t.reshape(n, c // (b * b), h * b, w * b)

    return kernel


@op("SpaceToDepth")
def space_to_depth(node: NodeInfo) -> Kernel:
    b = node.attr("blocksize")
    crd = node.attr("mode", "DCR") == "CRD"  # the mode attribute exists from opset 28

    def kernel(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = x.reshape(n, c, h // b, b, w // b, b)
        t = t.permute(0, 1, 3, 5, 2, 4) if crd else t.permute(0, 3, 5, 1, 2, 4)
        return t.reshape(n, c * b * b, h // b, w // b)

    return kernel
