"""Triton kernels of the dequant-matmul family: ``epilogue(x @ dequant(W))`` for W4A16 / W8A16.

One kernel source covers the three regimes; `spec.choose_config` picks the constants:

- GEMV (M <= 16): a few rows of x; without tensor cores for M <= 2 (a broadcast multiply and a
  sum over K), one 16-row ``tl.dot`` tile above (wasted MMA rows cost nothing next to the weight
  read, and the tile keeps 16-byte weight loads), split along K so that one row still spreads the
  weight over every SM.
- split-K (16 < M <= 128): tensor-core tiles, still split along K when the N tiles alone would
  leave SMs idle.
- GEMM (M > 128): tensor-core tiles, no split.

With ``SPLIT_K > 1`` every split writes fp32 partial sums to a workspace; the split that
finishes a tile last adds them in split order and applies the epilogue (`_reduce_if_last`, one
launch), or with ``serial_reduce=False`` `_reduce_kernel` does in a second launch. Otherwise the
epilogue runs in the main kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kompakt.codegen.counters import tile_counters
from kompakt.codegen.dequant_matmul.layout import PackedWeight
from kompakt.codegen.dequant_matmul.reference import ACTIVATIONS, gated
from kompakt.codegen.dequant_matmul.spec import Config, choose_config
from kompakt.errors import CodegenError

_ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}


@triton.jit
def _activation(y, ACT: tl.constexpr):
    # codes follow reference.ACTIVATIONS: none, relu, silu, gelu, gelu_tanh
    if ACT == 1:
        y = tl.maximum(y, 0.0)
    elif ACT == 2:
        y = y * tl.sigmoid(y)
    elif ACT == 3:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 4:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)  # sqrt(2/pi) (y + 0.044715 y^3)
        y = y * tl.sigmoid(2.0 * inner)  # 0.5 (1 + tanh(t)) == sigmoid(2t)
    return y


@triton.jit
def _epilogue(
    acc, rm, rn, M, N, scales_ptr, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, GLU: tl.constexpr = False, BLOCK_M: tl.constexpr = 16,
    BLOCK_N: tl.constexpr = 16,
):  # fmt: skip
    n_ok = rn < N
    if PER_CHANNEL:  # one scale per column: applied once here instead of per weight
        acc = acc * tl.load(scales_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GLU:  # columns alternate gate and up: out[:, j] = act(gate_j) * up_j, N / 2 columns
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        acc = _activation(gate, ACT) * up
        rn = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        n_ok = rn < N // 2
    else:
        acc = _activation(acc, ACT)
    mask = (rm < M)[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + rm[:, None] * stride_rm + rn[None, :], mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def dequant_matmul_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, residual_ptr, out_ptr, partial_ptr,
    M, N, K, stride_xm, stride_rm, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr = False,
    EVEN_K: tl.constexpr = False, counter_ptr=None, SERIAL_REDUCE: tl.constexpr = False,
    GLU: tl.constexpr = False,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    last = tl.minimum(first + per_split, k_tiles)
    if PER_CHANNEL:
        zero = tl.load(zeros_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    for tile in range(first, last):
        rk = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :],
            mask=m_ok[:, None] & (rk < K)[None, :],
            other=0.0,
        )
        if BITS == 4:
            # BLOCK_K // 8 int32 words per column hold the tile's BLOCK_K nibbles
            rw = tile * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
            if EVEN_K:  # every tile is whole: no row mask (it costs registers in the GEMM tile)
                words = tl.load(qw_ptr + rw[:, None] * N + rn[None, :], mask=n_ok[None, :], other=0)
            else:  # the last tile must not read past the last packed row
                words = tl.load(
                    qw_ptr + rw[:, None] * N + rn[None, :],
                    mask=(rw < tl.cdiv(K, 8))[:, None] & n_ok[None, :],
                    other=0,
                )
            shifts = 4 * tl.arange(0, 8)
            q = (words[:, None, :] >> shifts[None, :, None]) & 0xF
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))
        else:
            q = tl.load(
                qw_ptr + rk[:, None] * N + rn[None, :],
                mask=(rk < K)[:, None] & n_ok[None, :],
                other=0,
            )
        if PER_CHANNEL:
            w = q.to(tl.float32) - zero
        else:  # BLOCK_K divides GROUP (spec), so the whole tile shares one row of scales
            g = (tile * BLOCK_K) // GROUP
            scale = tl.load(scales_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            zp = tl.load(zeros_ptr + g * N + rn, mask=n_ok, other=0.0).to(tl.float32)
            w = (q.to(tl.float32) - zp[None, :]) * scale[None, :]
        if UPCAST:  # bf16 under Triton's interpreter: its bf16 arithmetic is wrong, fp32 is not
            x = x.to(tl.float32)
        if USE_DOT:
            if x.dtype == tl.float32:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w.to(x.dtype))
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
    if SPLIT_K == 1:
        _epilogue(acc, rm, rn, M, N, scales_ptr, bias_ptr, residual_ptr, out_ptr, stride_rm,
                  stride_om, PER_CHANNEL, HAS_BIAS, ACT, HAS_RESIDUAL, GLU, BLOCK_M, BLOCK_N)  # fmt: skip
    else:
        offs = pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(partial_ptr + offs, acc, mask=m_ok[:, None] & n_ok[None, :])
        if SERIAL_REDUCE:
            _reduce_if_last(
                partial_ptr, counter_ptr, pid_m * tl.num_programs(0) + pid_n, rm, rn, M, N,
                scales_ptr, bias_ptr, residual_ptr, out_ptr, stride_rm, stride_om,
                PER_CHANNEL, HAS_BIAS, ACT, HAS_RESIDUAL, SPLIT_K, BLOCK_M, BLOCK_N, GLU,
            )  # fmt: skip


@triton.jit
def _sum_partials(
    partial_ptr, rm, rn, M, N, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The tile's fp32 partials [SPLIT_K, M, N] summed in split order (deterministic, unlike
    atomic adds), read past L1 (``.cg``: it may hold an earlier call's lines)."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        offs = s * M * N + rm[:, None] * N + rn[None, :]
        acc += tl.load(partial_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _reduce_if_last(
    partial_ptr, counter_ptr, tile, rm, rn, M, N, scales_ptr, bias_ptr, residual_ptr, out_ptr,
    stride_rm, stride_om, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, GLU: tl.constexpr,
):  # fmt: skip
    """Split-K without a second launch: the split that finishes a tile last sums every split's
    partials (in split order: deterministic) and runs the epilogue, then re-arms the tile's
    counter for the next launch. The barrier orders all threads' partial stores before the
    release; the partials are read past L1 (``.cg``), which may hold an earlier call's lines."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:
        acc = _sum_partials(partial_ptr, rm, rn, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
        _epilogue(acc, rm, rn, M, N, scales_ptr, bias_ptr, residual_ptr, out_ptr, stride_rm,
                  stride_om, PER_CHANNEL, HAS_BIAS, ACT, HAS_RESIDUAL, GLU, BLOCK_M, BLOCK_N)  # fmt: skip
        tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _reduce_kernel(
    partial_ptr, scales_ptr, bias_ptr, residual_ptr, out_ptr, M, N, stride_rm, stride_om,
    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, GLU: tl.constexpr = False,
):  # fmt: skip
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _sum_partials(partial_ptr, rm, rn, M, N, SPLIT_K, BLOCK_M, BLOCK_N)
    _epilogue(acc, rm, rn, M, N, scales_ptr, bias_ptr, residual_ptr, out_ptr, stride_rm,
              stride_om, PER_CHANNEL, HAS_BIAS, ACT, HAS_RESIDUAL, GLU, BLOCK_M, BLOCK_N)  # fmt: skip


def launch_dequant_matmul(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    act: str = "none",
    residual: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``epilogue(x @ W)`` for x [..., K] fp16/bf16/fp32; returns [..., N] in x's dtype."""
    k, n = weight.k, weight.n
    if x.shape[-1] != k:
        raise CodegenError(f"x has {x.shape[-1]} features but the weight expects K = {k}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise CodegenError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    try:
        glu, base_act = gated(act)
    except ValueError as err:
        raise CodegenError(str(err)) from None
    if glu and n % 2:
        raise CodegenError(f"a gated activation ({act}) needs an even N, got {n}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_out = n // 2 if glu else n  # a gated activation pairs the weight's columns
    out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n_out)
    res2 = None
    if residual is not None:
        if tuple(residual.shape) != (*lead, n_out):
            raise CodegenError(
                f"residual shape {list(residual.shape)} does not match the output {[*lead, n_out]}"
            )
        res2 = residual.reshape(-1, n_out)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
    if bias is not None and tuple(bias.shape) != (n,):
        raise CodegenError(f"bias shape {list(bias.shape)} must be [{n}]")
    per_channel = weight.scales.shape[0] == 1
    config = config or choose_config(m, n, k, weight.group_size, weight.bits)
    if not per_channel and weight.group_size % config.block_k:
        raise CodegenError(
            f"block_k {config.block_k} must divide the group size {weight.group_size}"
        )
    partial = (
        torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
        if config.split_k > 1
        else out  # unused placeholder
    )
    dummy = out
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    counters = None
    if config.split_k > 1 and config.serial_reduce:
        counters = tile_counters(x.device, grid[0] * grid[1])
    flags = dict(
        PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        ACT=_ACT_CODES[base_act],
        HAS_RESIDUAL=res2 is not None,
        GLU=glu,
    )
    dequant_matmul_kernel[grid](
        x2, weight.qweight, weight.scales, weight.zeros,
        dummy if bias is None else bias, dummy if res2 is None else res2, out, partial,
        m, n, k, x2.stride(0), 0 if res2 is None else res2.stride(0), out.stride(0),
        BITS=weight.bits, GROUP=weight.group_size, **flags,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, USE_DOT=config.use_dot,
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        EVEN_K=k % config.block_k == 0,
        counter_ptr=counters, SERIAL_REDUCE=counters is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if config.split_k > 1 and counters is None:
        block_m = min(16, triton.next_power_of_2(m))
        reduce_grid = (triton.cdiv(n, 128), triton.cdiv(m, block_m))
        _reduce_kernel[reduce_grid](
            partial, weight.scales, dummy if bias is None else bias,
            dummy if res2 is None else res2, out, m, n,
            0 if res2 is None else res2.stride(0), out.stride(0), **flags,
            SPLIT_K=config.split_k, BLOCK_M=block_m, BLOCK_N=128,
        )  # fmt: skip
    return out.reshape(*lead, n_out)
