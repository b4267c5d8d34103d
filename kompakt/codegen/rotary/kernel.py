"""Triton kernel and launcher of the rotary family (rotary position embedding, HF convention).

A program owns ``BLOCK_S`` positions of one batch row and ``HEADS`` heads. It loads both halves of
its cos/sin tile once (the halves are equal in Hugging Face's tables, but loading both keeps the
kernel exact to the formula for any table) and rotates each head in turn:

    out1 = x1 * cos1 - x2 * sin1        (first half of the rotary features)
    out2 = x2 * cos2 + x1 * sin2        (second half)

Features past the rotary dim are copied. x may have any batch, head and position strides (e.g.
a transposed [B, S, H, D] projection; a non-unit feature stride is copied away); out is a
contiguous [B, H, S, D].
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kompakt.codegen.rotary.reference import as_batch_seq_dim
from kompakt.codegen.rotary.spec import Config, choose_config, constants
from kompakt.errors import CodegenError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    H, S, D, HALF, S_BLOCKS,
    stride_xb, stride_xh, stride_xs,  # features are contiguous (unit stride) in x, cos and sin
    stride_cb, stride_cs,  # stride_cb = 0: one table for the whole batch
    stride_sb, stride_ss,
    x2_ptr, out2_ptr, H2, stride_x2b, stride_x2h, stride_x2s, GROUPS,  # PAIR: the second tensor
    BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
    HEADS: tl.constexpr, HAS_PASS: tl.constexpr, PAIR: tl.constexpr,
    # APPEND (with PAIR): x2's rotated rows go into a [B, H2, N, D] cache (out2, strides o2) at
    # row pos[s], and v's rows are copied into another (vout) at the same rows
    pos_ptr=None, N=0, stride_o2b=0, stride_o2h=0, stride_o2n=0,
    v_ptr=None, vout_ptr=None, stride_vb=0, stride_vh=0, stride_vs=0,
    stride_vob=0, stride_voh=0, stride_von=0, GROUPS2=0,
    APPEND: tl.constexpr = False, BLOCK_D: tl.constexpr = 16,
):  # fmt: skip
    # Batch and position blocks share grid axis 0 (axis 1 and 2 stop at 65535 programs).
    pid = tl.program_id(0)
    b = (pid // S_BLOCKS).to(tl.int64)  # int64: b * stride_xb passes 2^31 on large batches
    s = (pid % S_BLOCKS) * BLOCK_S + tl.arange(0, BLOCK_S)
    j = tl.arange(0, BLOCK_HALF)
    mask = (s < S)[:, None] & (j < HALF)[None, :]
    group = tl.program_id(1)
    if APPEND:
        # ScatterND's rows: negative positions count from the end; out-of-range rows are not
        # written (the caller's positions are checked where they are made)
        row = tl.load(pos_ptr + s, mask=s < S, other=-1).to(tl.int64)
        row = tl.where(row < 0, row + N, row)
        row_ok = (s < S) & (row >= 0) & (row < N)
        if group >= GROUPS + GROUPS2:  # v's head groups follow k's: copied, no tables
            _copy_heads(
                v_ptr, vout_ptr, H2, D, b, s, row, row_ok, stride_vb, stride_vh, stride_vs,
                stride_vob, stride_voh, stride_von, (group - GROUPS - GROUPS2) * HEADS,
                HEADS, BLOCK_D,
            )  # fmt: skip
            return
    c_off = b * stride_cb + s[:, None] * stride_cs
    s_off = b * stride_sb + s[:, None] * stride_ss
    cos1 = tl.load(cos_ptr + c_off + j[None, :], mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_off + (j + HALF)[None, :], mask=mask, other=0.0)
    sin1 = tl.load(sin_ptr + s_off + j[None, :], mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + s_off + (j + HALF)[None, :], mask=mask, other=0.0)
    cos2 = cos2.to(tl.float32)
    sin2 = sin2.to(tl.float32)
    if PAIR and group >= GROUPS:  # the second tensor's head groups follow the first's
        h_start = (group - GROUPS) * HEADS
        if APPEND:  # into the cache, at the rows the positions name
            o_row = out2_ptr + b * stride_o2b + h_start.to(tl.int64) * stride_o2h
            o_row += row[:, None] * stride_o2n
            _rotate_heads(
                x2_ptr, o_row, stride_o2h, row_ok, H2, S, D, HALF, b, s, j, mask,
                cos1, cos2, sin1, sin2, stride_x2b, stride_x2h, stride_x2s, h_start,
                BLOCK_PASS, HEADS, HAS_PASS,
            )  # fmt: skip
        else:  # a contiguous [B, H2, S, D]
            o_row = out2_ptr + ((b * H2 + h_start) * S + s[:, None]) * D
            _rotate_heads(
                x2_ptr, o_row, S * D, s < S, H2, S, D, HALF, b, s, j, mask, cos1, cos2, sin1,
                sin2, stride_x2b, stride_x2h, stride_x2s, h_start, BLOCK_PASS, HEADS, HAS_PASS,
            )  # fmt: skip
    else:
        h_start = group * HEADS
        o_row = out_ptr + ((b * H + h_start) * S + s[:, None]) * D  # a contiguous [B, H, S, D]
        _rotate_heads(
            x_ptr, o_row, S * D, s < S, H, S, D, HALF, b, s, j, mask, cos1, cos2, sin1, sin2,
            stride_xb, stride_xh, stride_xs, h_start, BLOCK_PASS, HEADS, HAS_PASS,
        )  # fmt: skip


@triton.jit
def _rotate_heads(
    x_ptr, o_row, stride_oh, rows_ok, H, S, D, HALF, b, s, j, mask, cos1, cos2, sin1, sin2,
    stride_xb, stride_xh, stride_xs, h_start,
    BLOCK_PASS: tl.constexpr, HEADS: tl.constexpr, HAS_PASS: tl.constexpr,
):  # fmt: skip
    """Rotates heads [h_start, h_start + HEADS) of x (fewer at the end) into the rows o_row
    points at (one per position, stepping stride_oh per head; rows_ok: which are written)."""
    if HAS_PASS:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = (s < S)[:, None] & (p < D)[None, :]
        pass_store = rows_ok[:, None] & (p < D)[None, :]
    store = rows_ok[:, None] & (j < HALF)[None, :]
    # Pointers to this program's first head, stepped one head per iteration.
    x_row = x_ptr + b * stride_xb + h_start.to(tl.int64) * stride_xh
    x_row += s.to(tl.int64)[:, None] * stride_xs  # S x a [B, S, H, D] row stride can pass 2^31
    for _ in range(h_start, tl.minimum(h_start + HEADS, H)):  # the last group may be short
        x1 = tl.load(x_row + j[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (j + HALF)[None, :], mask=mask, other=0.0)
        x2 = x2.to(tl.float32)
        out1 = x1 * cos1 - x2 * sin1
        out2 = x2 * cos2 + x1 * sin2
        tl.store(o_row + j[None, :], out1.to(o_row.dtype.element_ty), mask=store)
        tl.store(o_row + (j + HALF)[None, :], out2.to(o_row.dtype.element_ty), mask=store)
        if HAS_PASS:
            kept = tl.load(x_row + p[None, :], mask=pass_mask)
            tl.store(o_row + p[None, :], kept, mask=pass_store)
        x_row += stride_xh
        o_row += stride_oh


@triton.jit
def _copy_heads(
    v_ptr, vout_ptr, H, D, b, s, row, rows_ok, stride_vb, stride_vh, stride_vs,
    stride_vob, stride_voh, stride_von, h_start, HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Copies heads [h_start, h_start + HEADS) of v's positions s into vout's rows ``row``."""
    d = tl.arange(0, BLOCK_D)
    v_row = v_ptr + b * stride_vb + h_start.to(tl.int64) * stride_vh
    v_row += s.to(tl.int64)[:, None] * stride_vs
    o_row = vout_ptr + b * stride_vob + h_start.to(tl.int64) * stride_voh
    o_row += row[:, None] * stride_von
    store = rows_ok[:, None] & (d < D)[None, :]
    for _ in range(h_start, tl.minimum(h_start + HEADS, H)):
        tl.store(o_row + d[None, :], tl.load(v_row + d[None, :], mask=store), mask=store)
        v_row += stride_vh
        o_row += stride_voh


def launch_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, config: Config | None = None
) -> torch.Tensor:
    """Rotary embedding of x [B, H, S, D] by cos/sin [B or 1, S, R] (R <= D, even; also [S, R]
    or [B or 1, 1, S, R]). Returns a contiguous [B, H, S, D] in x's dtype."""
    return _launch(x, None, cos, sin, config)[0]


def launch_rotary_pair(
    x: torch.Tensor,
    x2: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`launch_rotary` of q and k in one launch: x [B, H, S, D] and x2 [B, H2, S, D] (H2 may
    differ: grouped-query attention) share the tables; the second's head groups follow the
    first's on the grid. ``config`` is chosen for H + H2 heads."""
    _check_tensor("x2", x2, device=x.device if isinstance(x, torch.Tensor) else None)
    return _launch(x, x2, cos, sin, config)


def launch_rotary_append(
    x: torch.Tensor,
    x2: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    config: Config | None = None,
) -> torch.Tensor:
    """`launch_rotary_pair` whose second tensor (k) goes straight into a KV cache, with v beside
    it, in one launch: ``k_cache[b, h, positions[s]] = rotary(x2)[b, h, s]`` and
    ``v_cache[b, h, positions[s]] = v[b, h, s]``, written into the given caches [B, H2, N, D]
    (x2 and v are [B, H2, S, D], any strides but unit features; positions [S] integers on the
    device, negative ones counting from N as ScatterND's, out-of-range ones not written).
    Returns rotary(x), a contiguous [B, H, S, D]."""
    _check_tensor("x2", x2, device=x.device if isinstance(x, torch.Tensor) else None)
    for name, t in (("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, t, device=x2.device)
        if t.dim() != 4 or t.dtype != x2.dtype or t.stride(-1) != 1:
            raise CodegenError(
                f"rotary: {name} must be a 4-D {x2.dtype} tensor with contiguous features, "
                f"got {t.dtype} {list(t.shape)} strides {t.stride()}"
            )
    batch, heads2, seq, head_dim = x2.shape
    if tuple(v.shape) != tuple(x2.shape):
        raise CodegenError(f"rotary: v {list(v.shape)} must be shaped like k {list(x2.shape)}")
    if k_cache.shape != v_cache.shape or (*k_cache.shape[:2], k_cache.shape[3]) != (
        batch,
        heads2,
        head_dim,
    ):
        raise CodegenError(
            f"rotary: k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} must both "
            f"be [{batch}, {heads2}, N, {head_dim}]"
        )
    if not isinstance(positions, torch.Tensor) or positions.shape != (seq,):
        got = list(positions.shape) if isinstance(positions, torch.Tensor) else positions
        raise CodegenError(f"rotary: positions must be [{seq}] integers, got {got}")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != x2.device:
        raise CodegenError(
            f"rotary: positions must be int32/int64 on {x2.device}, got {positions.dtype} on "
            f"{positions.device}"
        )
    return _launch(x, x2, cos, sin, config, (positions, k_cache, v, v_cache))[0]


def _launch(x, x2, cos, sin, config, append=None):
    _check_tensor("x", x)
    if x.dim() != 4:
        raise CodegenError(f"rotary: x must be [B, H, S, D], got shape {list(x.shape)}")
    batch, heads, seq, head_dim = x.shape
    if x2 is not None:
        if x2.dim() != 4 or (x2.shape[0], x2.shape[2], x2.shape[3]) != (batch, seq, head_dim):
            raise CodegenError(
                f"rotary: x2 must be [{batch}, H2, {seq}, {head_dim}] like x {list(x.shape)}, "
                f"got {list(x2.shape)}"
            )
        if x2.dtype != x.dtype:
            raise CodegenError(f"rotary: x2 has dtype {x2.dtype} but x has {x.dtype}")
    tables = {}
    for name, table in (("cos", cos), ("sin", sin)):
        _check_tensor(name, table, device=x.device)
        t = as_batch_seq_dim(table)
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq:
            raise CodegenError(
                f"rotary: {name} must be [{batch} or 1, {seq}, R] for x {list(x.shape)}, "
                f"got {list(table.shape)}"
            )
        tables[name] = _unit_feature_stride(t)
    cos3, sin3 = tables["cos"], tables["sin"]
    if cos3.shape != sin3.shape:
        raise CodegenError(f"rotary: cos {list(cos.shape)} and sin {list(sin.shape)} differ")
    rotary_dim = cos3.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise CodegenError(
            f"rotary: rotary dim (cos/sin last dim) must be even and in [2, {head_dim}], "
            f"got {rotary_dim}"
        )
    x = _unit_feature_stride(x)
    out = torch.empty((batch, heads, seq, head_dim), dtype=x.dtype, device=x.device)
    pair = x2 is not None
    if not pair:
        x2, out2 = x, out  # any pointers: PAIR is off, they are never read
    elif append is not None:
        positions, out2, v, v_out = append  # x2's rows go into the k cache (out2)
        x2 = _unit_feature_stride(x2)
    else:
        x2 = _unit_feature_stride(x2)
        out2 = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    heads2 = x2.shape[1] if pair else 0
    outputs = (out, out2) if pair else (out,)
    if batch * seq * head_dim == 0 or heads + heads2 == 0:
        return outputs
    # v's heads, when appended, are a third set of head groups (a copy: cheaper than a rotation)
    config = config or choose_config(batch, heads + heads2, seq, head_dim, rotary_dim)
    s_blocks = triton.cdiv(seq, config.block_s)
    groups = triton.cdiv(heads, config.heads)
    groups2 = triton.cdiv(heads2, config.heads)
    extra = {}
    if append is not None:
        extra = dict(
            pos_ptr=positions, N=out2.shape[2],
            stride_o2b=out2.stride(0), stride_o2h=out2.stride(1), stride_o2n=out2.stride(2),
            v_ptr=v, vout_ptr=v_out, stride_vb=v.stride(0), stride_vh=v.stride(1),
            stride_vs=v.stride(2), stride_vob=v_out.stride(0), stride_voh=v_out.stride(1),
            stride_von=v_out.stride(2), GROUPS2=groups2, APPEND=True,
            BLOCK_D=triton.next_power_of_2(head_dim),
        )  # fmt: skip
    grid = (batch * s_blocks, groups + groups2 * (2 if append is not None else 1))
    rotary_kernel[grid](
        x, cos3, sin3, out,
        heads, seq, head_dim, rotary_dim // 2, s_blocks,
        x.stride(0), x.stride(1), x.stride(2),
        _batch_stride(cos3), cos3.stride(1),
        _batch_stride(sin3), sin3.stride(1),
        x2, out2, heads2, x2.stride(0), x2.stride(1), x2.stride(2), groups,
        **constants(config, head_dim, rotary_dim), PAIR=pair, **extra,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return outputs


def _unit_feature_stride(t: torch.Tensor) -> torch.Tensor:
    # Contiguous features let each thread's loads be one vector and share one base address; a
    # per-element stride would cost an address register per element (it doubled the registers).
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _batch_stride(table: torch.Tensor) -> int:
    return 0 if table.shape[0] == 1 else table.stride(0)


def _check_tensor(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise CodegenError(f"rotary: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise CodegenError(f"rotary: {name} has dtype {t.dtype}, expected one of: {known}")
    if device is not None and t.device != device:
        raise CodegenError(f"rotary: {name} is on {t.device} but x is on {device}")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CodegenError(f"rotary: {name} is on {t.device}; the Triton kernel needs CUDA")
