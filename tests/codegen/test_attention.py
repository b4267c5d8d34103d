"""Attention kernels: numerics vs the torch reference (Triton interpreter on CPU), input checks,
the launch heuristic and cost model, and AOT builds for sm_80/sm_90."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from _launch_spy import LaunchSpy

pytest.importorskip("triton")

from kompakt.codegen.aot import compile_variants  # noqa: E402
from kompakt.codegen.attention import (  # noqa: E402
    Config,
    aot_variants,
    attention_reference,
    choose_config,
    cost,
    launch_flash_decode,
    launch_flash_prefill,
)
from kompakt.errors import CodegenError  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tiny tiles keep the interpreter fast (it pays per program and loop step); 16 is tl.dot's minimum.
TINY = Config(block_m=16, block_n=16, num_warps=4, num_stages=1)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def rand(*shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(dtype=dtype, device=DEVICE)


def qkv(batch, heads_q, heads_kv, seq_q, seq_kv, head_dim, dtype, seed=0):
    q = rand(batch, heads_q, seq_q, head_dim, dtype=dtype, seed=seed)
    k = rand(batch, heads_kv, seq_kv, head_dim, dtype=dtype, seed=seed + 1)
    v = rand(batch, heads_kv, seq_kv, head_dim, dtype=dtype, seed=seed + 2)
    return q, k, v


def f32(*shape):
    return torch.zeros(*shape, device=DEVICE)


def assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# (B, Hq, Hkv, Sq, Skv, D): no length a multiple of 16; GQA groups 1, 2 and 4.
PREFILL_SHAPES = [
    (2, 2, 2, 19, 37, 16),  # Sq < Skv: new tokens attending to a cache and themselves
    (1, 4, 2, 21, 21, 32),  # Sq == Skv: the plain lower triangle
    (2, 4, 1, 17, 40, 16),  # multi-query attention
    (1, 4, 1, 1, 23, 16),  # a single query through the prefill kernel
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_matches_reference(shape, causal, dtype):
    q, k, v = qkv(*shape, dtype=dtype)
    out = launch_flash_prefill(q, k, v, causal=causal, config=TINY)
    assert_close(out, attention_reference(q, k, v, causal), dtype)


def test_prefill_more_queries_than_keys_without_mask():
    q, k, v = qkv(1, 2, 2, 20, 3, 16, torch.float32)
    out = launch_flash_prefill(q, k, v, causal=False, scale=0.3, config=TINY)
    assert_close(out, attention_reference(q, k, v, False, scale=0.3), torch.float32)


def test_prefill_default_config_and_strided_inputs():
    # [B, S, H, D] storage viewed as [B, H, S, D], as a fused QKV projection leaves it; the
    # heuristic's own tile (64 rows) rather than the tiny one.
    q = rand(1, 13, 4, 64, dtype=torch.float16, seed=3).transpose(1, 2)
    k = rand(1, 29, 2, 64, dtype=torch.float16, seed=4).transpose(1, 2)
    v = rand(1, 29, 2, 64, dtype=torch.float16, seed=5).transpose(1, 2)
    assert not q.is_contiguous()
    out = launch_flash_prefill(q, k, v, causal=True)
    assert out.transpose(1, 2).is_contiguous()  # heads merge into [B, S, H*D] without a copy
    assert_close(out, attention_reference(q, k, v, True), torch.float16)


def padding_mask(batch, seq_q, seq_kv, dtype, seed):
    """[B, 1, Sq, Skv] additive mask: 0 or -inf at random, row 0 of batch 0 hidden entirely,
    row 1 of batch 0 finfo.min everywhere (softmax of equal values: uniform, not zeros)."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, 1, seq_q, seq_kv, generator=generator) < 0.7
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    mask[0, 0, 0] = float("-inf")
    if seq_q > 1:
        mask[0, 0, 1] = torch.finfo(torch.float32).min
    mask += 0.5 * torch.randn(keep.shape, generator=generator)  # a soft bias, too
    return mask.to(dtype=dtype, device=DEVICE)


# (B, Hq, Hkv, Sq, Skv, D): no length a multiple of 16.
MASK_SHAPES = [(2, 4, 2, 19, 37, 16), (1, 2, 1, 1, 23, 32), (2, 2, 2, 21, 21, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_additive_mask(shape, causal, dtype):
    q, k, v = qkv(*shape, dtype=dtype)
    mask = padding_mask(shape[0], shape[3], shape[4], torch.float32, seed=5)
    if dtype == torch.float32:  # fp16 masks go through fp16 scores; keep the fp32 one for those
        mask = mask.to(dtype)
    out = launch_flash_prefill(q, k, v, causal=causal, mask=mask, config=TINY)
    ref = attention_reference(q, k, v, causal, mask=mask)
    assert_close(out, ref, dtype)
    assert torch.all(out[0, :, 0] == 0)  # the hidden row: zeros, not NaN
    assert not out.isnan().any()


@pytest.mark.parametrize(
    "mask_shape", [(1, 1, 13, 29), (13, 29), (2, 4, 13, 29), (29,)], ids=["11SK", "SK", "BHSK", "K"]
)
def test_prefill_broadcast_masks(mask_shape):
    q, k, v = qkv(2, 4, 2, 13, 29, 16, torch.float32, seed=13)
    mask = rand(*mask_shape, dtype=torch.float32, seed=14)
    out = launch_flash_prefill(q, k, v, causal=False, scale=0.2, mask=mask, config=TINY)
    assert_close(out, attention_reference(q, k, v, False, 0.2, mask=mask), torch.float32)


def test_prefill_bool_mask_keeps_true():
    q, k, v = qkv(2, 2, 2, 17, 20, 16, torch.float16, seed=15)
    keep = torch.rand(2, 1, 17, 20, generator=torch.Generator().manual_seed(16)) < 0.5
    keep[1, 0, 3] = False  # a row that sees nothing
    keep = keep.to(DEVICE)
    out = launch_flash_prefill(q, k, v, causal=False, mask=keep, config=TINY)
    assert_close(out, attention_reference(q, k, v, False, mask=keep), torch.float16)
    assert torch.all(out[1, :, 3] == 0)
    # The same as the additive mask 0 / -inf.
    additive = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    same = launch_flash_prefill(q, k, v, causal=False, mask=additive.half(), config=TINY)
    assert_close(out, same, torch.float16)


def test_prefill_zero_mask_equals_no_mask():
    q, k, v = qkv(1, 2, 2, 18, 18, 16, torch.float32, seed=17)
    zero = torch.zeros(1, 1, 18, 18, device=DEVICE)
    out = launch_flash_prefill(q, k, v, causal=True, mask=zero, config=TINY)
    assert_close(out, launch_flash_prefill(q, k, v, causal=True, config=TINY), torch.float32)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (f32(1, 2, 5, 4), r"mask \(1, 2, 5, 4\) does not broadcast"),
        (f32(1, 3, 4, 4), "does not broadcast"),
        (f32(1, 1, 1, 4, 4), "rank <= 4"),
        (torch.zeros(4, 4, dtype=torch.int32, device=DEVICE), "mask is torch.int32"),
        ("x", "got str"),
    ],
    ids=["rows", "heads", "rank", "int", "type"],
)
def test_prefill_rejects_bad_masks(mask, match):
    q = f32(1, 2, 4, 16)
    with pytest.raises(CodegenError, match=match):
        launch_flash_prefill(q, q, q, causal=False, mask=mask)


# (B, Hq, Hkv, Skv, D, lengths): lengths include 1, the full cache and a partial last chunk.
DECODE_CASES = [
    (2, 2, 2, 50, 16, [1, 37]),
    (2, 4, 2, 50, 32, [50, 17]),
    (1, 4, 1, 45, 16, [33]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_decode_matches_reference(case, dtype):
    batch, heads_q, heads_kv, seq_kv, head_dim, lengths = case
    q, k, v = qkv(batch, heads_q, heads_kv, 1, seq_kv, head_dim, dtype)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    # 16-key chunks: 4 splits of 50 keys, some empty for short sequences, one half full.
    out = launch_flash_decode(q, k, v, lengths, config=Config(block_n=16, num_splits=4))
    assert_close(out, attention_reference(q, k, v, False, lengths=lengths), dtype)


@pytest.mark.parametrize("masked", [False, True], ids=["lengths", "mask"])
def test_decode_in_one_launch_equals_the_combine_kernel(masked, monkeypatch):
    """The chunk that finishes last combines the partials (no second launch): the same result
    as the combine kernel, with empty chunks and padded heads (GQA group 2 in a 16-row tile),
    and the arrival counters back at zero afterwards."""
    from kompakt.codegen.attention import kernel as attention_kernel
    from kompakt.codegen.counters import tile_counters

    q, k, v = qkv(2, 4, 2, 1, 50, 16, torch.float32, seed=5)
    lengths = torch.tensor([1, 37], dtype=torch.int32, device=DEVICE)
    mask = None
    if masked:  # hide keys past each length, finfo.min style, instead of passing lengths
        keys = torch.arange(50, device=DEVICE)
        mask = torch.where(keys[None, :] < lengths[:, None], 0.0, torch.finfo(torch.float32).min)
        mask, lengths = mask[:, None, None, :], None
    combines = []
    real = attention_kernel.flash_decode_combine_kernel
    monkeypatch.setattr(attention_kernel, "flash_decode_combine_kernel", LaunchSpy(real, combines))
    config = Config(block_n=16, num_splits=4)
    one = launch_flash_decode(q, k, v, lengths, config=config, mask=mask)
    assert combines == []
    assert int(tile_counters(q.device, 1).abs().sum()) == 0
    two = launch_flash_decode(
        q, k, v, lengths, config=Config(block_n=16, num_splits=4, one_launch=False), mask=mask
    )
    assert len(combines) == 1
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
    want = attention_reference(q, k, v, False, lengths=torch.tensor([1, 37], device=DEVICE))
    assert_close(one, want, torch.float32)


@pytest.mark.parametrize("one_launch", [True, False])
def test_rows_that_see_no_key_are_nan_when_asked(one_launch):
    """empty_nan: a sequence whose mask is -inf everywhere gets NaN (an unguarded softmax's
    answer), in decode (either combine) and prefill; the other rows are unchanged."""
    q, k, v = qkv(2, 4, 2, 1, 40, 16, torch.float32, seed=3)
    mask = torch.zeros(2, 1, 1, 40, device=DEVICE)
    mask[1] = float("-inf")
    config = Config(block_n=16, num_splits=3, one_launch=one_launch)
    zero = launch_flash_decode(q, k, v, None, config=config, mask=mask)
    nan = launch_flash_decode(q, k, v, None, config=config, mask=mask, empty_nan=True)
    assert torch.all(zero[1] == 0) and torch.isnan(nan[1]).all()
    assert torch.equal(nan[0], zero[0])
    prefill = launch_flash_prefill(q, k, v, causal=False, mask=mask, empty_nan=True)
    assert torch.isnan(prefill[1]).all() and not torch.isnan(prefill[0]).any()


def test_decode_default_config_int64_lengths_and_large_group():
    # 32 query heads on one kv head: the head tile grows past 16 rows (BLOCK_H = 32).
    q, k, v = qkv(1, 32, 1, 1, 20, 16, torch.float16, seed=7)
    lengths = torch.tensor([20], dtype=torch.int64, device=DEVICE)
    out = launch_flash_decode(q, k, v, lengths)
    assert_close(out, attention_reference(q, k, v, False, lengths=lengths), torch.float16)


def test_decode_empty_and_overlong_lengths():
    q, k, v = qkv(2, 2, 1, 1, 20, 16, torch.float32, seed=9)
    lengths = torch.tensor([0, 99], dtype=torch.int32, device=DEVICE)
    out = launch_flash_decode(q, k, v, lengths, config=Config(block_n=16, num_splits=2))
    assert torch.all(out[0] == 0)  # no live key: zeros, not NaN
    full = attention_reference(q[1:], k[1:], v[1:], False)  # 99 is clamped to the 20 stored
    assert_close(out[1:], full, torch.float32)


def test_decode_agrees_with_prefill_on_the_last_position():
    q, k, v = qkv(1, 4, 2, 9, 9, 32, torch.float32, seed=11)
    lengths = torch.tensor([9], dtype=torch.int32, device=DEVICE)
    last = launch_flash_decode(q[:, :, -1:], k, v, lengths, config=Config(block_n=16))
    full = launch_flash_prefill(q, k, v, causal=True, config=TINY)
    assert_close(last, full[:, :, -1:], torch.float32)


def cache_mask(batch, seq_kv, live, dtype, hidden=float("-inf")):
    """A static cache's decode mask [B, 1, 1, Skv]: 0 on the first live[b] slots, `hidden` on
    the rest (as kv_cache.py builds it)."""
    slots = torch.arange(seq_kv, device=DEVICE)
    dead = slots[None, :] >= torch.tensor(live, device=DEVICE)[:, None]
    mask = torch.zeros(batch, seq_kv, device=DEVICE).masked_fill(dead, hidden)
    return mask.view(batch, 1, 1, seq_kv).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_decode_with_a_mask_matches_reference_and_prefill(case, dtype):
    batch, heads_q, heads_kv, seq_kv, head_dim, live = case
    q, k, v = qkv(batch, heads_q, heads_kv, 1, seq_kv, head_dim, dtype, seed=21)
    mask = cache_mask(batch, seq_kv, live, dtype)
    mask = mask + rand(1, heads_q, 1, seq_kv, dtype=dtype, seed=22)  # per head, per slot
    split = Config(block_n=16, num_splits=4)  # 16-key chunks, the last one partial
    out = launch_flash_decode(q, k, v, None, config=split, mask=mask)
    assert_close(out, attention_reference(q, k, v, False, mask=mask), dtype)
    assert_close(out, launch_flash_prefill(q, k, v, False, mask=mask, config=TINY), dtype)
    # With lengths as well, both apply: a length of 1 keeps slot 0 alone.
    lengths = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    out = launch_flash_decode(q, k, v, lengths, config=split, mask=mask)
    assert_close(out, attention_reference(q, k, v, False, lengths=lengths, mask=mask), dtype)


def test_decode_mask_hidden_rows_finfo_min_and_bool():
    q, k, v = qkv(3, 4, 2, 1, 45, 16, torch.float32, seed=23)
    split = Config(block_n=16, num_splits=3)
    # Batch 0 sees slot 40 only (one split), batch 1 nothing (-inf everywhere: zeros), batch 2
    # sees 7 slots; finfo.min must not overflow on the way (the mask is never scaled).
    mask = cache_mask(3, 45, [41, 0, 7], torch.float32, hidden=torch.finfo(torch.float32).min)
    mask[0, ..., :40] = torch.finfo(torch.float32).min
    mask[1] = float("-inf")
    out = launch_flash_decode(q, k, v, None, config=split, mask=mask)
    assert_close(out, attention_reference(q, k, v, False, mask=mask), torch.float32)
    assert torch.all(out[1] == 0) and not out.isnan().any()
    assert_close(out[0], v[0, :, 40:41].repeat_interleave(2, 0), torch.float32)
    # finfo.min across a whole row: every score equal, a uniform average, as the reference says.
    flat = torch.full((1, 1, 1, 45), torch.finfo(torch.float32).min, device=DEVICE)
    out = launch_flash_decode(q, k, v, None, config=split, mask=flat)
    assert_close(out, attention_reference(q, k, v, False, mask=flat), torch.float32)
    keep = cache_mask(3, 45, [41, 0, 7], torch.float32) == 0
    out = launch_flash_decode(q, k, v, None, config=split, mask=keep)
    assert_close(out, attention_reference(q, k, v, False, mask=keep), torch.float32)
    with pytest.raises(CodegenError, match=r"does not broadcast to the scores"):
        launch_flash_decode(q, k, v, None, mask=f32(3, 1, 2, 45))


@pytest.mark.parametrize("kind", ["add", "bool"])
def test_decode_never_reads_keys_past_the_last_one_the_mask_shows(kind):
    """A static cache's mask hides the unwritten slots (-inf, or False); the kernel reads K and
    V only up to the last slot some head may see. NaN written into the hidden slots, whole
    chunks and the tail of a partial one, must not reach the output."""
    q, k, v = qkv(2, 4, 2, 1, 70, 16, torch.float32, seed=31)
    live = [21, 3]  # chunks of 16: batch 0 ends inside its second chunk, batch 1 in its first
    mask = cache_mask(2, 70, live, torch.float32)
    if kind == "bool":
        mask = mask == 0
    want = torch.stack(
        [
            attention_reference(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], False)[0]
            for b, n in enumerate(live)
        ]
    )
    for b, n in enumerate(live):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    out = launch_flash_decode(q, k, v, None, config=Config(block_n=16, num_splits=5), mask=mask)
    assert_close(out, want, torch.float32)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((f32(1, 2, 4, 48), f32(1, 2, 4, 48), f32(1, 2, 4, 48)), "D=48"),
        ((f32(1, 3, 4, 16), f32(1, 2, 4, 16), f32(1, 2, 4, 16)), "Hq=3 .* Hkv=2"),
        ((f32(1, 2, 4, 16), f32(1, 2, 4, 16), f32(1, 2, 5, 16)), r"v \(1, 2, 5, 16\)"),
        ((f32(1, 2, 4, 16), f32(2, 2, 4, 16), f32(2, 2, 4, 16)), "batch or head dim"),
        ((f32(2, 4, 16), f32(1, 2, 4, 16), f32(1, 2, 4, 16)), "q must be a 4-D"),
        ((f32(1, 2, 4, 16).to(torch.bfloat16),) + (f32(1, 2, 4, 16),) * 2, "bfloat16"),
        ((f32(1, 2, 4, 16), f32(1, 2, 4, 16).half(), f32(1, 2, 4, 16)), "k is torch.float16"),
        ((f32(1, 2, 5, 16), f32(1, 2, 4, 16), f32(1, 2, 4, 16)), "causal prefill needs Sq <= Skv"),
        ((f32(1, 2, 4, 16), f32(1, 2, 0, 16), f32(1, 2, 0, 16)), "no keys"),
    ],
    ids=["D48", "groups", "kv-shape", "batch", "rank", "bf16", "mixed", "causal", "empty"],
)
def test_prefill_rejects_bad_inputs(args, match):
    with pytest.raises(CodegenError, match=match):
        launch_flash_prefill(*args, causal=True)


def test_prefill_rejects_bad_config():
    q = f32(1, 2, 4, 16)
    with pytest.raises(CodegenError, match="block_n=24"):
        launch_flash_prefill(q, q, q, config=Config(block_m=16, block_n=24))


def test_decode_rejects_bad_inputs():
    q, cache = f32(2, 4, 1, 16), f32(2, 2, 8, 16)
    ok = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(CodegenError, match="Sq != 1"):
        launch_flash_decode(f32(2, 4, 2, 16), cache, cache, ok)
    with pytest.raises(CodegenError, match=r"lengths must be a \[2\] tensor"):
        launch_flash_decode(q, cache, cache, ok[:1])
    with pytest.raises(CodegenError, match="lengths is torch.float32"):
        launch_flash_decode(q, cache, cache, ok.float())
    with pytest.raises(CodegenError, match="D=48"):
        launch_flash_decode(f32(2, 4, 1, 48), f32(2, 2, 8, 48), f32(2, 2, 8, 48), ok)
    with pytest.raises(CodegenError, match="Hq=4 .* Hkv=3"):
        launch_flash_decode(q, f32(2, 3, 8, 16), f32(2, 3, 8, 16), ok)
    with pytest.raises(CodegenError, match="num_splits=0"):
        launch_flash_decode(q, cache, cache, ok, config=Config(num_splits=0))


def test_choose_config_regimes():
    # Long fp16 prompts: 128-row tiles, 8 warps at D=128.
    long = choose_config(4, 32, 8, 4096, 4096, 128, 2, "sm_90")
    assert (long.block_m, long.num_warps, long.num_splits) == (128, 8, 1)
    # Short prompt or too few programs to fill the GPU: 64 rows.
    assert choose_config(1, 8, 8, 48, 48, 128, 2, "sm_90").block_m == 64
    assert choose_config(1, 4, 4, 1024, 1024, 64, 2, "sm_80").block_m == 64
    # Ampere at D=128 with 64 rows takes 32-key steps (64 spill).
    assert choose_config(1, 4, 4, 1024, 1024, 128, 2, "sm_80").block_n == 32
    assert choose_config(2, 8, 8, 512, 512, 128, 4, "sm_90").block_m == 32  # fp32
    # Decode: one long sequence is split to fill the GPU; a large batch or short cache is not.
    one = choose_config(1, 32, 8, 1, 32768, 128, 2, "sm_90")
    assert one.num_splits == 33  # cdiv(2 * 132 SMs, 8 kv heads)
    assert choose_config(64, 32, 8, 1, 4096, 128, 2, "sm_90").num_splits == 1
    assert choose_config(1, 32, 8, 1, 300, 128, 2, "sm_90").num_splits == 1  # < 2 x 256 keys
    assert choose_config(1, 1, 1, 1, 1 << 20, 128, 2, "sm_80").num_splits == 64  # the cap
    for cfg in (long, one):
        assert cfg.block_n >= 16 and cfg.block_n & (cfg.block_n - 1) == 0


def test_cost():
    flops, moved = cost(1, 2, 1, 4, 6, 16, causal=False)
    assert flops == 4 * 2 * 16 * 24
    assert moved == 2 * (2 * 2 * 4 * 16 + 2 * 1 * 6 * 16)
    # Causal, Sq = 4 of Skv = 6: rows see 3, 4, 5, 6 keys.
    assert cost(1, 2, 1, 4, 6, 16, causal=True)[0] == 4 * 2 * 16 * 18
    # Decode partials: (D + 2) fp32 per split and head, written then read.
    assert cost(1, 2, 1, 1, 6, 16, num_splits=3)[1] - cost(1, 2, 1, 1, 6, 16)[1] == 8 * 2 * 3 * 18


def test_package_import_does_not_need_triton():
    code = "import sys, kompakt.codegen.attention; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_builds(arch):
    built = compile_variants(aot_variants(arch))
    for b in built:
        print(b.summary())
        assert b.registers > 0
        # specialized like a launch on contiguous heads: q, K, V load in 16-byte vectors
        assert b.widest_load_bits == 128 and b.spill_stores == 0, b.summary()
    prefill = [b for b in built if b.variant.kernel.endswith("flash_prefill_kernel")]
    tiles = sorted(
        (b.variant.signature["Q"], b.variant.constants["BLOCK_M"], b.variant.constants["MASK"])
        for b in prefill
    )
    assert tiles == [
        ("*fp16", 64, "add"),  # what fuse-attention binds: an fp16 additive mask
        ("*fp16", 64, "none"),
        ("*fp16", 128, "none"),
        ("*fp32", 64, "none"),
    ]
    for b in prefill:
        assert b.uses_wgmma if arch == "sm_90" else b.uses_mma and not b.uses_wgmma
    split = [b for b in built if b.variant.kernel.endswith("flash_decode_split_kernel")]
    assert split and all(b.uses_mma for b in split)  # 16-row head tile: mma.sync on both
    for b in split:  # the last chunk combines: release/acquire, partials past L1
        atom = b.ptx.index("atom.global.gpu.acq_rel.add")
        assert "ld.global.cg" in b.ptx[atom:]
        assert "atom.global.gpu.relaxed.exch" in b.ptx[atom:]
    assert sorted(b.variant.constants["MASK"] for b in split) == ["add", "none"]


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_prefill_real_size(causal):
    q, k, v = qkv(2, 32, 8, 1000, 1000, 128, torch.float16)
    out = launch_flash_prefill(q, k, v, causal=causal)
    torch.testing.assert_close(out, attention_reference(q, k, v, causal), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_decode_real_size():
    q, k, v = qkv(3, 32, 8, 1, 8192, 128, torch.float16)
    lengths = torch.tensor([1, 5000, 8192], dtype=torch.int32, device=DEVICE)
    out = launch_flash_decode(q, k, v, lengths)
    ref = attention_reference(q, k, v, False, lengths=lengths)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
    # the in-launch merge's memory ordering, which the interpreter cannot show: launch after
    # launch, the same as the combine kernel's merge
    two = launch_flash_decode(q, k, v, lengths, config=_with(out, one_launch=False))
    for _ in range(50):
        torch.testing.assert_close(launch_flash_decode(q, k, v, lengths), two, atol=1e-3, rtol=0)


def _with(out, **changes):
    from dataclasses import replace

    from kompakt.codegen.attention.spec import choose_config

    config = choose_config(3, 32, 8, 1, 8192, 128, out.element_size(), "sm_90")
    return replace(config, **changes)


@pytest.mark.gpu
def test_gpu_prefill_padding_mask_real_size():
    q, k, v = qkv(2, 32, 8, 1000, 1000, 128, torch.float16)
    mask = padding_mask(2, 1000, 1000, torch.float16, seed=21)
    out = launch_flash_prefill(q, k, v, causal=True, mask=mask)
    ref = attention_reference(q, k, v, True, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_decode_cache_mask_real_size():
    q, k, v = qkv(3, 32, 8, 1, 8192, 128, torch.float16)
    mask = cache_mask(3, 8192, [1, 5000, 8192], torch.float16, torch.finfo(torch.float16).min)
    out = launch_flash_decode(q, k, v, None, mask=mask)
    ref = attention_reference(q, k, v, False, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)
