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
_KNOWN_ROLES = {"x", "x2", "cos", "sin", "bound", "k_cache", "v_cache", "positions", "v"}


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
    if "k_cache" in index:
        return _bind_append(node, index, where)
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


def _bind_append(node: ir.Node, index: dict[str, int], where: str) -> Callable[..., object]:
    """q/k rotation with k and v written into their caches (fuse-rotary's ``append_kv``): the
    closure returns (per ``output_roles``) q's rotation and the updated caches, written into
    copies of the fed caches; its ``in_place`` variant writes into the fed caches themselves."""
    from kompakt.codegen.rotary.kernel import launch_rotary_append

    for required in ("x2", "v_cache", "positions", "v"):
        if required not in index:
            raise CodegenError(f"{where}: a KV-append node needs an input with role '{required}'")
    perm, v_perm = _perm(node, "cache_perm", where), _perm(node, "v_perm", where)
    attr = node.attributes.get("output_roles")
    out_roles = list(attr.as_strings()) if attr is not None else []
    if sorted(out_roles) != ["k_cache", "v_cache", "x"] or len(node.outputs) != 3:
        raise CodegenError(f"{where}: output_roles must name x, k_cache and v_cache once each")
    dtype = node.inputs[index["x"]].dtype
    for role in ("x2", "v", "k_cache", "v_cache"):
        value = node.inputs[index[role]]
        if value.dtype != dtype:
            raise CodegenError(f"{where}: {role} '{value.name}' is not {_name(dtype)} like x")
    # [B, H, N, D] views of what ScatterND indexes as [N, B, H, D] (and v as [S, B, H, D])
    to_bhnd = [perm[1], perm[2], perm[0], perm[3]]
    v_bhsd = [v_perm[1], v_perm[2], v_perm[0], v_perm[3]]

    def run(inputs: tuple[torch.Tensor, ...], in_place: bool) -> tuple[torch.Tensor, ...]:
        k_cache, v_cache = inputs[index["k_cache"]], inputs[index["v_cache"]]
        if not in_place:  # the graph's semantics: the fed caches stay as they were
            k_cache, v_cache = k_cache.clone(), v_cache.clone()
        q = launch_rotary_append(
            inputs[index["x"]], inputs[index["x2"]], inputs[index["v"]].permute(v_bhsd),
            inputs[index["cos"]], inputs[index["sin"]], inputs[index["positions"]].reshape(-1),
            k_cache.permute(to_bhnd), v_cache.permute(to_bhnd),
        )  # fmt: skip
        by_role = {"x": q, "k_cache": k_cache, "v_cache": v_cache}
        return tuple(by_role[role] for role in out_roles)

    def kernel(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run(inputs, in_place=False)

    def in_place(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run(inputs, in_place=True)

    kernel.in_place = in_place  # type: ignore[attr-defined]  # the plan's donating runs use it
    return kernel


def _perm(node: ir.Node, name: str, where: str) -> list[int]:
    attr = node.attributes.get(name)
    perm = [int(i) for i in attr.as_ints()] if attr is not None else None
    if perm is None or sorted(perm) != [0, 1, 2, 3] or perm[3] != 3:
        raise CodegenError(
            f"{where}: {name} must be a permutation of 4 axes keeping features last, got {perm}"
        )
    return perm


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
