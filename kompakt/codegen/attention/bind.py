"""Binds an ``attention`` fused node (see passes/fuse/fuse_attention.py) to the prefill kernel,
or, for a call with one query per sequence whose keys the heuristic splits (a decode step over a
static KV cache: Sq = 1 against all Smax slots, the mask hiding the empty ones), to split-K decode.

The node's ``roles`` name its inputs: ``q``, ``k``, ``v`` ([B, H, S, D], k and v before any GQA
repeat), ``mask`` (added to the scores), and the operands the body needed but the kernel does not
(``scale`` constants, already multiplied into the ``scale`` attribute, the NaN guard's ``zero``,
``shape`` operands of the transposes and repeats). What the kernel cannot take is rejected here,
at plan time, so the backend runs the body through torch instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.attention.spec import HEAD_DIMS, Config, choose_config
from kompakt.codegen.binding import input_roles
from kompakt.codegen.devices import tuning_arch
from kompakt.errors import CodegenError

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
_MASK_DTYPES = (*_DTYPES, ir.DataType.BOOL)
_KNOWN_ROLES = {"q", "k", "v", "mask", "scale", "zero", "shape"}


def bind(node: ir.Node, device: torch.device) -> Callable[..., torch.Tensor]:
    """A kernel closure taking the fused node's inputs; returns the attention output."""
    from kompakt.codegen.attention.kernel import launch_flash_decode, launch_flash_prefill

    where = f"attention node '{node.name}'"
    index = input_roles(node, _KNOWN_ROLES, where)
    for required in ("q", "k", "v"):
        if required not in index:
            raise CodegenError(f"{where}: no input has the role '{required}'")
    scale_attr = node.attributes.get("scale")
    scale = scale_attr.as_float() if scale_attr is not None else math.nan
    if not math.isfinite(scale):
        raise CodegenError(f"{where}: scale must be a finite float, got {scale_attr}")
    causal = bool(node.attributes.get_int("causal", 0))
    has_mask = bool(node.attributes.get_int("has_mask", 0))
    if has_mask != ("mask" in index):
        raise CodegenError(f"{where}: has_mask={int(has_mask)} but roles are {sorted(index)}")
    q, k, v = (node.inputs[index[r]] for r in ("q", "k", "v"))
    for role, value in (("q", q), ("k", k), ("v", v)):
        if value.dtype not in _DTYPES or value.dtype != q.dtype:
            raise CodegenError(
                f"{where}: {role} '{value.name}' is {_name(value.dtype)}; the kernel takes fp16 "
                f"or fp32, one type for q, k and v (q is {_name(q.dtype)})"
            )
        if value.shape is None or len(value.shape) != 4:
            raise CodegenError(f"{where}: {role} '{value.name}' is not [B, H, S, D]: {value.shape}")
    head_dim = q.shape[3]
    if head_dim not in HEAD_DIMS or k.shape[3] != head_dim or v.shape[3] != head_dim:
        raise CodegenError(
            f"{where}: head dims q {q.shape[3]}, k {k.shape[3]}, v {v.shape[3]}; the kernel "
            f"takes one D in {HEAD_DIMS} (a power of two from 16 to 128)"
        )
    heads_q, heads_kv = q.shape[1], k.shape[1]
    if isinstance(heads_q, int) and isinstance(heads_kv, int) and heads_q % heads_kv:
        raise CodegenError(f"{where}: Hq={heads_q} is not a multiple of Hkv={heads_kv}")
    mask_at = index.get("mask")
    if mask_at is not None:
        _check_mask(node.inputs[mask_at], q, k, where)
    out = node.outputs[0]
    if len(node.outputs) != 1 or (out.dtype is not None and out.dtype != q.dtype):
        raise CodegenError(f"{where}: expects one output of q's dtype {_name(q.dtype)}")
    q_at, k_at, v_at = index["q"], index["k"], index["v"]

    nan_rows = bool(node.attributes.get_int("nan_rows", 0))

    def kernel(*inputs: torch.Tensor) -> torch.Tensor:
        mask = None if mask_at is None else inputs[mask_at]
        q, k, v = inputs[q_at], inputs[k_at], inputs[v_at]
        # The graph's softmax has no NaN guard: a row that sees no key (masked -inf everywhere)
        # is NaN there, and the kernels write NaN for it (no extra launch).
        empty_nan = nan_rows and mask is not None and mask.is_floating_point()
        decode = _decode_config(q, k)
        if decode is not None:
            # One query (a decode step over a static cache): split the keys across programs.
            # Causal needs nothing here: the one query is the last position and sees every key.
            return launch_flash_decode(
                q, k, v, None, scale=scale, config=decode, mask=mask, empty_nan=empty_nan
            )
        return launch_flash_prefill(
            q, k, v, causal=causal, scale=scale, mask=mask, empty_nan=empty_nan
        )

    return kernel


def _decode_config(q: torch.Tensor, k: torch.Tensor) -> Config | None:
    """The split-K decode config when q holds one query per sequence and the heuristic splits
    its keys; None otherwise: with one split decode runs B * Hkv programs, no more than
    prefill's B * Hq, and adds a combine launch, so prefill keeps those calls."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1:
        return None
    batch, heads_q, _, head_dim = q.shape
    config = choose_config(
        batch, heads_q, k.shape[1], 1, k.shape[2], head_dim, q.element_size(), tuning_arch(q.device)
    )
    return config if config.num_splits > 1 else None


def _check_mask(mask: ir.Value, q: ir.Value, k: ir.Value, where: str) -> None:
    """Rank <= 4, a dtype the kernel reads, and dims that are 1 or those of the scores where the
    shapes are static (symbolic dims are checked by the launcher at run time)."""
    if mask.dtype not in _MASK_DTYPES:
        raise CodegenError(
            f"{where}: mask '{mask.name}' is {_name(mask.dtype)}; not fp16/fp32/bool"
        )
    if mask.shape is None or len(mask.shape) > 4:
        raise CodegenError(f"{where}: mask '{mask.name}' has shape {mask.shape}, not rank <= 4")
    scores = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]]
    for dim, full in zip(reversed(list(mask.shape)), reversed(scores), strict=False):
        if isinstance(dim, int) and dim != 1 and isinstance(full, int) and dim != full:
            raise CodegenError(
                f"{where}: mask {list(mask.shape)} does not broadcast to the scores {scores}"
            )


def _name(dtype: ir.DataType | None) -> str:
    return dtype.name if dtype is not None else "of unknown dtype"
