"""Binds a ``rotary`` fused node (see passes/fuse/fuse_rotary.py) to the rotary family's kernel.

The node's ``roles`` name its inputs: ``x`` (the [B, H, S, D] tensor, whole even under partial
rotary), ``cos`` and ``sin`` (the tables), and ``bound`` (the Slices' constant bounds, already
proven by the pass and read into ``rotary_dim``). Everything the kernel cannot take is rejected
here, at plan time, with the static shapes, so the backend runs the body through torch instead of
failing at the first call.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.binding import input_roles
from kompakt.errors import CodegenError

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_KNOWN_ROLES = {"x", "x2", "cos", "sin", "bound"}


def bind(node: ir.Node, device: torch.device) -> Callable[..., object]:
    """A kernel closure taking the fused node's inputs; returns its output (two, in order, for a
    q/k pair: roles ``x`` and ``x2``)."""
    from kompakt.codegen.rotary.kernel import launch_rotary

    where = f"rotary node '{node.name}'"
    index = input_roles(node, _KNOWN_ROLES, where)
    for required in ("x", "cos", "sin"):
        if required not in index:
            raise CodegenError(f"{where}: no input has the role '{required}'")
    x = node.inputs[index["x"]]
    if x.dtype not in _DTYPES:
        raise CodegenError(
            f"{where}: x '{x.name}' is {_name(x.dtype)}; the kernel takes fp16/bf16/fp32"
        )
    shape = list(x.shape) if x.shape is not None else None  # dims: int or ir.SymbolicDim
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int):
        raise CodegenError(
            f"{where}: x '{x.name}' must be [B, H, S, D] with a static D, got {x.shape}"
        )
    batch, _, seq, head_dim = shape
    attr = node.attributes.get("rotary_dim")
    rotary_dim = attr.value if attr is not None and attr.type == ir.AttributeType.INT else None
    if rotary_dim is None or rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise CodegenError(
            f"{where}: rotary_dim must be an even int in [2, {head_dim}], got {rotary_dim}"
        )
    for role in ("cos", "sin"):
        table = node.inputs[index[role]]
        dims = list(table.shape) if table.shape is not None else None
        if table.dtype not in _DTYPES or not _table_fits(dims, batch, seq, rotary_dim):
            raise CodegenError(
                f"{where}: {role} '{table.name}' must be a float [{seq}, {rotary_dim}], "
                f"[1, {seq}, {rotary_dim}] or [{batch} or 1, 1, {seq}, {rotary_dim}], "
                f"got {_name(table.dtype)}{table.shape if dims is not None else '[?]'}"
            )
    rotated = [x] if "x2" not in index else [x, node.inputs[index["x2"]]]
    if len(node.outputs) != len(rotated):
        raise CodegenError(
            f"{where}: the kernel writes {len(rotated)} output(s), the node has {len(node.outputs)}"
        )
    for value, out in zip(rotated, node.outputs, strict=True):
        if value.dtype != x.dtype:
            raise CodegenError(f"{where}: x2 '{value.name}' is not {_name(x.dtype)} like x")
        if out.dtype is not None and out.dtype != x.dtype:
            raise CodegenError(
                f"{where}: output '{out.name}' is {_name(out.dtype)}, but the kernel writes "
                f"x's dtype {_name(x.dtype)}"
            )
        if out.shape is not None and value.shape is not None and out.shape != value.shape:
            raise CodegenError(
                f"{where}: output shape {out.shape} differs from its input {value.shape}"
            )

    x_at, cos_at, sin_at = index["x"], index["cos"], index["sin"]
    if len(rotated) == 2:
        from kompakt.codegen.rotary.kernel import launch_rotary_pair

        x2_at = index["x2"]

        def pair(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return launch_rotary_pair(inputs[x_at], inputs[x2_at], inputs[cos_at], inputs[sin_at])

        return pair

    def kernel(*inputs: torch.Tensor) -> torch.Tensor:
        return launch_rotary(inputs[x_at], inputs[cos_at], inputs[sin_at])

    return kernel


def _table_fits(dims: list | None, batch: object, seq: object, rotary_dim: int) -> bool:
    """[S, R], [1, S, R] or [B or 1, 1, S, R] with S, R (and B) equal to x's.

    The kernel reads a 3-D table as [B or 1, S, R], but in the graph a 3-D table broadcasts
    against x [B, H, S, D] from the right, its first dim meeting the heads: only 1 means the same.
    """
    if dims is None or not 2 <= len(dims) <= 4 or dims[-1] != rotary_dim:
        return False
    if not _same_dim(dims[-2], seq):
        return False
    if len(dims) == 3:
        return dims[0] == 1
    return len(dims) == 2 or (dims[1] == 1 and (dims[0] == 1 or _same_dim(dims[0], batch)))


def _same_dim(a: object, b: object) -> bool:
    """Provably equal: equal ints, or symbolic dims of one known name (``sequence``)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and a.value is not None and a == b


def _name(dtype: ir.DataType | None) -> str:
    return dtype.name if dtype is not None else "of unknown dtype"
