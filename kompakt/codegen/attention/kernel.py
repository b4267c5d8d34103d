"""Triton kernels of the attention family and their launchers (see README.md for the layouts).

Softmax runs in base 2: scores are multiplied by ``scale * log2(e)`` once, so every exponential is
an ``exp2`` (one MUFU instruction) and the stored row maxima live in that domain too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kompakt.codegen.attention.checks import (
    check_config,
    check_inputs,
    check_lengths,
    check_mask,
)
from kompakt.codegen.attention.spec import Config, choose_config
from kompakt.codegen.counters import tile_counters
from kompakt.codegen.devices import tuning_arch
from kompakt.errors import CodegenError

LOG2E = 1.4426950408889634


@triton.jit
def _attend(
    acc, l_i, m_i, q, k_base, v_base, mask_base, start, end, offs_m, row_end, key_end, diag,
    qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax of q against keys [start, end), one BLOCK_N step at a time.

    MASK_KEYS: the range may hold keys >= key_end (and, with CAUSAL, keys j > row + diag); the
    caller runs the bulk of the keys with it off so most steps skip the compares and selects.
    Without a mask every row sees at least one key in the first step it runs, so m_i is finite
    after it and exp2(m_i - m_new) never computes -inf - -inf.

    MASK: "none"; "add", a float tensor added to the scores; "bool", True keeps a key. With a
    mask, scores are in natural units and exponentials are exp: the mask is added as it is
    (scaling it by log2(e) would overflow finfo.min, a common "masked" value, to -inf), and a row
    may see no key for a while (or ever): its maximum is -inf, and 0 is subtracted instead.
    """
    offs_d = tl.arange(0, HEAD_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # K is read as its transpose [D, BLOCK_N] so the score tile is a plain q @ kT.
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASK_KEYS:
            kt = tl.load(kt_ptrs, mask=offs_n[None, :] < key_end, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < key_end, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        if MASK != "none":
            m_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            m_ok = offs_m[:, None] < row_end  # padding rows of the last block read nothing
            if MASK_KEYS:
                m_ok = m_ok & (offs_n[None, :] < key_end)
            if MASK == "bool":
                keep = tl.load(m_ptrs, mask=m_ok, other=0) != 0
                s = tl.where(keep, s, float("-inf"))
            else:
                s = s + tl.load(m_ptrs, mask=m_ok, other=0.0).to(tl.float32)
        if MASK_KEYS:
            valid = offs_n[None, :] < key_end
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK == "none":
            alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
            p = tl.exp2(s - m_new[:, None])
        else:
            # A row that has seen no unmasked key yet keeps m = -inf; subtracting 0 for it gives
            # alpha = p = exp(-inf) = 0 rather than exp(-inf - -inf) = NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_sub)
            p = tl.exp(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _live_end(
    mask_base, start, end, offs_g, group, stride_mh, stride_mn,
    MASK: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """1 + the last key in [start, end) that the mask lets some row of the tile see (a bool
    True, or an additive value above -inf); ``start`` when it lets none. A static KV cache's
    mask hides the unwritten slots with -inf, so decode reads only the written ones: the mask
    is a few bytes per key, K and V a few hundred."""
    last = start - 1
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = (offs_g[:, None] < group) & (offs_n[None, :] < end)
        m_ptrs = mask_base + offs_g[:, None] * stride_mh + offs_n[None, :] * stride_mn
        if MASK == "bool":
            seen = tl.load(m_ptrs, mask=ok, other=0) != 0
        else:
            seen = tl.load(m_ptrs, mask=ok, other=float("-inf")).to(tl.float32) > float("-inf")
        keys = tl.where(seen & ok, offs_n[None, :], start - 1)
        last = tl.maximum(last, tl.max(tl.max(keys, 1), 0))
    return last + 1


@triton.jit
def flash_prefill_kernel(
    Q, K, V, Mask, Out, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    heads_q, group, seq_q, seq_kv,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EMPTY_NAN: tl.constexpr = False,
):  # fmt: skip
    """One program per (batch * query head, block of BLOCK_M queries), on a 1-D grid.

    Mask (MASK != "none") is indexed [b, h, i, j] by its own strides: 0 on broadcast dims."""
    num_m = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0)
    # Query blocks of one head are neighbours in launch order, so they share K/V in L2; under a
    # causal mask the last blocks see the most keys, so they start first and the tail is short.
    pid_m = num_m - 1 - pid % num_m
    pid_bh = pid // num_m
    b = (pid_bh // heads_q).to(tl.int64)  # 64-bit: b * stride_b can pass 2**31 on large caches
    h = pid_bh % heads_q
    kvh = (h // group).to(tl.int64)  # GQA by index: query head h reads kv head h // group
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    row_ok = offs_m[:, None] < seq_q
    q_ptrs = (
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    diag = seq_kv - seq_q  # query i sees keys j <= i + diag (bottom-right alignment)
    if CAUSAL:
        first = pid_m * BLOCK_M
        last = tl.minimum(first + BLOCK_M, seq_q)  # one past the block's last real row
        # Keys every row of the block sees need no mask; keys no row sees are never loaded.
        full_end = tl.minimum(seq_kv, first + diag + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(seq_kv, last + diag)
    else:
        full_end = seq_kv // BLOCK_N * BLOCK_N
        hi = seq_kv
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, k_base, v_base, mask_base, 0, full_end, offs_m, seq_q, seq_kv, diag,
        qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        False, CAUSAL, MASK, HEAD_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, k_base, v_base, mask_base, full_end, hi, offs_m, seq_q, seq_kv, diag,
        qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        True, CAUSAL, MASK, HEAD_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    if MASK != "none":
        # a row the mask hid entirely: acc = 0, out = 0, or NaN as an unguarded softmax gives
        l_i = tl.where(l_i > 0.0, l_i, float("nan") if EMPTY_NAN else 1.0)
    out = acc / l_i[:, None]
    o_ptrs = (
        Out
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok)


@triton.jit
def flash_decode_split_kernel(
    Q, K, V, Lengths, Mask, Mpart, Lpart, AccPart, qk_scale,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mn,
    heads_kv, group, seq_kv, chunk, num_splits,
    HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    Out=None, stride_ob=0, stride_oh=0, stride_od=0, Counters=None,
    COMBINE: tl.constexpr = False, EMPTY_NAN: tl.constexpr = False,
):  # fmt: skip
    """One program per (batch * kv head, key chunk): all `group` query heads of that kv head.

    The group's queries are the rows of one [BLOCK_H, D] tile (padded to 16 for tl.dot), so each
    K/V tile is read once for the whole group. Writes the unnormalized partial (m, l, acc).
    Without HAS_LENGTHS every key of the cache is a candidate (Lengths is not read). MASK as in
    _attend, indexed [b, h, j] (the query axis is 1): with one, m is in natural units, else base 2.
    With COMBINE the last chunk of a (batch, kv head) to finish combines every chunk's partials
    into Out (`_combine_if_last`), and no combine kernel runs.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // heads_kv).to(tl.int64)
    kvh = (pid % heads_kv).to(tl.int64)
    # Clamped so a length beyond the cache cannot read past it.
    length = tl.minimum(tl.load(Lengths + b), seq_kv) if HAS_LENGTHS else seq_kv
    start = split * chunk
    end = tl.minimum(start + chunk, length)  # <= start: this split has no live key

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_D)
    head_ok = offs_g < group
    heads = kvh * group + offs_g
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=head_ok[:, None], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    # The tile's rows are query heads, so _attend's row stride over the mask is its head stride
    # and its row bound is the group (padding heads read no mask).
    mask_base = Mask + b * stride_mb + kvh * group * stride_mh

    if MASK != "none":  # keys past the last one the mask lets any row see are never read
        end = _live_end(mask_base, start, end, offs_g, group, stride_mh, stride_mn, MASK, BLOCK_N)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_D], tl.float32)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, k_base, v_base, mask_base, start, full_end, offs_g, group, end, 0,
        qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mh, stride_mn,
        False, False, MASK, HEAD_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, k_base, v_base, mask_base, full_end, end, offs_g, group, end, 0,
        qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mh, stride_mn,
        True, False, MASK, HEAD_D, BLOCK_N, DOT_PRECISION,
    )  # fmt: skip
    # Partials are [B * Hq, num_splits] and [B * Hq, num_splits, D], contiguous fp32.
    rows = (b * heads_kv * group + heads) * num_splits + split
    tl.store(Mpart + rows, m_i, mask=head_ok)
    tl.store(Lpart + rows, l_i, mask=head_ok)
    tl.store(AccPart + rows[:, None] * HEAD_D + offs_d[None, :], acc, mask=head_ok[:, None])
    if COMBINE:
        _combine_if_last(
            Mpart, Lpart, AccPart, Out, Counters, pid, b, heads, b * heads_kv * group + heads,
            head_ok, offs_d, stride_ob, stride_oh, stride_od, num_splits, MASK == "none",
            HEAD_D, BLOCK_H, EMPTY_NAN,
        )  # fmt: skip


@triton.jit
def _combine_if_last(
    Mpart, Lpart, AccPart, Out, Counters, pid, b, heads, rows, head_ok, offs_d,
    stride_ob, stride_oh, stride_od, num_splits, BASE2: tl.constexpr, HEAD_D: tl.constexpr,
    BLOCK_H: tl.constexpr, EMPTY_NAN: tl.constexpr,
):  # fmt: skip
    """flash_decode_combine_kernel's sum for the group's heads, run by the chunk that finishes
    last (its counter, bumped with release/acquire after a CTA barrier, says so); chunks are
    read in order past L1 (``.cg``), and the counter is re-armed for the next launch."""
    tl.debug_barrier()
    arrived = tl.atomic_add(Counters + pid, 1, sem="acq_rel", scope="gpu")
    if arrived == num_splits - 1:
        base = rows * num_splits  # the group's heads' first partial (split 0)
        m_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
        for s in range(num_splits):
            m = tl.load(Mpart + base + s, mask=head_ok, other=float("-inf"), cache_modifier=".cg")
            m_max = tl.maximum(m_max, m)
        m_sub = tl.where(m_max > float("-inf"), m_max, 0.0)  # as the combine kernel: no NaN
        total = tl.zeros([BLOCK_H], tl.float32)
        out = tl.zeros([BLOCK_H, HEAD_D], tl.float32)
        for s in range(num_splits):
            m = tl.load(Mpart + base + s, mask=head_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(Lpart + base + s, mask=head_ok, other=0.0, cache_modifier=".cg")
            acc_ptrs = AccPart + (base + s)[:, None] * HEAD_D + offs_d[None, :]
            acc = tl.load(acc_ptrs, mask=head_ok[:, None], other=0.0, cache_modifier=".cg")
            w = tl.exp2(m - m_sub) if BASE2 else tl.exp(m - m_sub)
            total += w * l_s
            out += w[:, None] * acc
        out = out / tl.where(total > 0.0, total, float("nan") if EMPTY_NAN else 1.0)[:, None]
        o_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=head_ok[:, None])
        tl.atomic_xchg(Counters + pid, 0, sem="relaxed", scope="gpu")


@triton.jit
def flash_decode_combine_kernel(
    Mpart, Lpart, AccPart, Out,
    stride_ob, stride_oh, stride_od,
    heads_q, num_splits,
    HEAD_D: tl.constexpr, BLOCK_S: tl.constexpr, BASE2: tl.constexpr,
    EMPTY_NAN: tl.constexpr = False,
):  # fmt: skip
    """One program per (batch * query head): out = sum_s w_s acc_s / sum_s w_s l_s,
    w_s = exp2(m_s - max_s m_s) (exp with BASE2 off: the maxima of a masked split are in
    natural units, the same base its p were taken in, so the rescale is exact). Empty splits
    (m = -inf) weigh 0; no live key at all gives 0."""
    pid = tl.program_id(0)
    b = (pid // heads_q).to(tl.int64)
    h = (pid % heads_q).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_D)
    split_ok = offs_s < num_splits
    base = pid.to(tl.int64) * num_splits
    m = tl.load(Mpart + base + offs_s, mask=split_ok, other=float("-inf"))
    l_s = tl.load(Lpart + base + offs_s, mask=split_ok, other=0.0)
    acc_ptrs = AccPart + (base + offs_s[:, None]) * HEAD_D + offs_d[None, :]
    acc = tl.load(acc_ptrs, mask=split_ok[:, None], other=0.0)
    m_max = tl.max(m, 0)
    # Empty splits have m = -inf and weigh exp2(-inf) = 0; if all are empty, subtract 0 rather
    # than -inf so no -inf - -inf = NaN appears.
    m_sub = tl.where(m_max > float("-inf"), m_max, 0.0)
    w = tl.exp2(m - m_sub) if BASE2 else tl.exp(m - m_sub)
    total = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(
        total > 0.0, total, float("nan") if EMPTY_NAN else 1.0
    )
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs promise fp32 math: plain tf32 would round the operands to 10 mantissa bits, and
    # "ieee" has no tensor-core path (ptxas spilled kilobytes). 3xTF32 splits each operand in a
    # high and a low tf32 part and keeps near-fp32 accuracy on tensor cores. fp16 operands ignore
    # the setting; "tf32" is merely Triton's default.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _output_for(q: torch.Tensor) -> torch.Tensor:
    """The [B, H, S, D] output, stored as [B, S, H, D]: the model's next ops transpose it to
    [B, S, H, D] and merge the heads, which are then views instead of a copy."""
    batch, heads, seq, head_dim = q.shape
    out = torch.empty(batch, seq, heads, head_dim, dtype=q.dtype, device=q.device)
    return out.permute(0, 2, 1, 3)


def launch_flash_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    config: Config | None = None,
    empty_nan: bool = False,
) -> torch.Tensor:
    """Attention of q [B, Hq, Sq, D] over k/v [B, Hkv, Skv, D] -> [B, Hq, Sq, D] in q's dtype,
    stored as [B, Sq, Hq, D] (`out.transpose(1, 2)` is contiguous).

    mask: optional, broadcastable to [B, Hq, Sq, Skv]; fp32/fp16 is added to the scaled scores,
    bool keeps the keys where it is True. A row that sees no key at all gives zeros, or NaN with
    ``empty_nan`` (what a softmax without a guard gives: an exported graph's).
    """
    batch, heads_q, seq_q, head_dim, heads_kv, seq_kv = check_inputs(q, k, v, ("k", "v"))
    if causal and seq_q > seq_kv:
        raise CodegenError(
            f"attention: causal prefill needs Sq <= Skv, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if mask is None:
        mask_kind, mask, mask_strides = "none", q, (0, 0, 0, 0)  # q: any pointer, never read
        qk_scale = scale * LOG2E  # base-2 softmax (see the module docstring)
    else:
        mask = check_mask(mask, (batch, heads_q, seq_q, seq_kv), q.device)
        mask_kind = "bool" if mask.dtype == torch.bool else "add"
        mask_strides = mask.stride()
        qk_scale = scale  # natural units: the mask is added as it is (see _attend)
    config = config or choose_config(
        batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, q.element_size(), tuning_arch(q.device)
    )
    check_config(config)
    out = _output_for(q)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(seq_q, config.block_m) * batch * heads_q,)
    flash_prefill_kernel[grid](
        q, k, v, mask, out, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        heads_q, heads_q // heads_kv, seq_q, seq_kv,
        HEAD_D=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=bool(causal),
        MASK=mask_kind, DOT_PRECISION=_dot_precision(q.dtype), EMPTY_NAN=bool(empty_nan),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def launch_flash_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor | None,
    scale: float | None = None,
    config: Config | None = None,
    mask: torch.Tensor | None = None,
    empty_nan: bool = False,
) -> torch.Tensor:
    """One query per sequence, q [B, Hq, 1, D], over the live keys of the caches.

    k_cache/v_cache are [B, Hkv, Smax, D]. lengths, [B] int32/int64 on q's device, keeps the
    first lengths[b] keys (values are clamped to Smax on the device); None keeps all Smax.
    mask: optional, broadcastable to [B, Hq, 1, Smax], as launch_flash_prefill's (added to the
    scaled scores, or bool keeping keys where True); it applies on top of lengths. A sequence
    that sees no key (length 0, or a mask of -inf everywhere) gets zeros (NaN with
    ``empty_nan``, as launch_flash_prefill).
    """
    batch, heads_q, seq_q, head_dim, heads_kv, seq_kv = check_inputs(
        q, k_cache, v_cache, ("k_cache", "v_cache")
    )
    if seq_q != 1:
        raise CodegenError(
            f"attention: decode takes one query per sequence, q is {tuple(q.shape)} "
            "(Sq != 1); use launch_flash_prefill"
        )
    if lengths is not None:
        check_lengths(lengths, batch, q.device)
        lengths = lengths.to(torch.int32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if mask is None:
        mask_kind, mask, mask_strides = "none", q, (0, 0, 0)  # q: any pointer, never read
        qk_scale = scale * LOG2E  # base-2 softmax (see the module docstring)
    else:
        mask = check_mask(mask, (batch, heads_q, 1, seq_kv), q.device)
        mask_kind = "bool" if mask.dtype == torch.bool else "add"
        mask_strides = (mask.stride(0), mask.stride(1), mask.stride(3))
        qk_scale = scale  # natural units: the mask is added as it is (see _attend)
    config = config or choose_config(
        batch, heads_q, heads_kv, 1, seq_kv, head_dim, q.element_size(), tuning_arch(q.device)
    )
    check_config(config)
    out = _output_for(q)
    if out.numel() == 0:
        return out
    # Chunks are whole key blocks; rounding can leave fewer splits than asked for.
    chunk = triton.cdiv(triton.cdiv(seq_kv, config.num_splits), config.block_n) * config.block_n
    splits = triton.cdiv(seq_kv, chunk)
    group = heads_q // heads_kv
    rows = batch * heads_q * splits
    m_part = torch.empty(rows, dtype=torch.float32, device=q.device)
    l_part = torch.empty(rows, dtype=torch.float32, device=q.device)
    acc_part = torch.empty(rows, head_dim, dtype=torch.float32, device=q.device)
    counters = tile_counters(q.device, batch * heads_kv) if config.one_launch else None
    flash_decode_split_kernel[(batch * heads_kv, splits)](
        q, k_cache, v_cache, q if lengths is None else lengths, mask, m_part, l_part, acc_part,
        qk_scale, q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(), *v_cache.stride(),
        *mask_strides, heads_kv, group, seq_kv, chunk, splits,
        HEAD_D=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=config.block_n,
        HAS_LENGTHS=lengths is not None, MASK=mask_kind, DOT_PRECISION=_dot_precision(q.dtype),
        Out=out, stride_ob=out.stride(0), stride_oh=out.stride(1), stride_od=out.stride(3),
        Counters=counters, COMBINE=counters is not None, EMPTY_NAN=bool(empty_nan),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if counters is None:
        flash_decode_combine_kernel[(batch * heads_q,)](
            m_part, l_part, acc_part, out, out.stride(0), out.stride(1), out.stride(3),
            heads_q, splits, HEAD_D=head_dim, BLOCK_S=triton.next_power_of_2(splits),
            BASE2=mask_kind == "none", EMPTY_NAN=bool(empty_nan), num_warps=4,
        )  # fmt: skip
    return out
