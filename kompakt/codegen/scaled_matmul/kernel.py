"""Triton kernels shared by the int8 and fp8 matmul families (`launch` checks inputs and runs them).

The operand type is read from the pointers at compile time: int8 operands accumulate exactly in
int32, e4m3 ones in fp32; an int8 ``xq`` quantizes onto +-127 integers, an e4m3 one onto the e4m3
grid up to +-448. Each type compiles to its own kernel, with no run-time branch.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(t):
    # Adding 1.5 * 2**23 leaves no fraction bits in an fp32 mantissa, so the add itself rounds to
    # an integer, half to even (IEEE default), like torch.round; exact for |t| < 2**22. Written out
    # because the interpreter has no libdevice rint.
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _scale_of(amax, QMAX: tl.constexpr):
    # div_rn: IEEE division, as torch does; a plain `/` may be approximate on the GPU.
    return tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)


@triton.jit
def _to_int8(x, scale):
    q = _round_half_even(tl.math.div_rn(x, scale))
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def _to_e4m3(x, scale):
    """x / scale, clamped to +-448 and rounded half to even onto the e4m3 grid, as float8e4nv.

    The rounding is done here in fp32 and the final cast only moves an exact value: the GPU's
    cvt.rn would agree, but the interpreter's fp32 -> fp8 cast does not round to nearest even.
    """
    t = tl.math.div_rn(x, scale)
    t = tl.minimum(tl.maximum(t, -448.0), 448.0)
    # e4m3 has 3 mantissa bits, so values in [2**e, 2**(e+1)) are 2**(e-3) apart; below 2**-6
    # (subnormals) they are 2**-9 apart. The powers of two are built from exponent bits.
    e = tl.maximum(((t.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3)
    inv_step = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2**(3 - e)
    return (_round_half_even(t * inv_step) * step).to(tl.float8e4nv)


@triton.jit
def _quantize(x, scale, INT8: tl.constexpr):
    return _to_int8(x, scale) if INT8 else _to_e4m3(x, scale)


@triton.jit
def _row_amax(x_row, K, BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    return tl.max(amax, axis=0)


@triton.jit
def row_amax_kernel(x_ptr, K, amax_ptr, stride_xm, BLOCK_K: tl.constexpr):
    """Per-tensor scaling, first pass: amax_ptr[0] = max over rows of max|x_row| (starts at 0)."""
    row = tl.program_id(0).to(tl.int64)
    # Non-negative fp32 values order like their bits, so atomic max is exact and order-free.
    tl.atomic_max(amax_ptr, _row_amax(x_ptr + row * stride_xm, K, BLOCK_K))


@triton.jit
def quantize_rows_kernel(
    x_ptr,
    K,
    xq_ptr,
    scale_ptr,
    amax_ptr,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    """Row ``pid`` of x [M, K] -> xq with scale = amax / QMAX (1 when amax is 0); amax is the
    row's (PER_ROW, scale [M]) or amax_ptr[0] from `row_amax_kernel` (scale []). QMAX is 127 for
    an int8 xq, 448 (the largest finite e4m3) for a float8e4nv one."""
    INT8: tl.constexpr = xq_ptr.dtype.element_ty == tl.int8
    QMAX: tl.constexpr = 127.0 if INT8 else 448.0
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK and PER_ROW:  # the row fits: read it once, keep it in registers
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(x), axis=0), QMAX)
        tl.store(q_row + offs, _quantize(x, scale, INT8), mask=offs < K)
        tl.store(scale_ptr + row, scale)
    else:
        if PER_ROW:  # two passes: amax, then quantize (the second read mostly hits L2)
            scale = _scale_of(_row_amax(x_row, K, BLOCK_K), QMAX)
            tl.store(scale_ptr + row, scale)
        else:
            scale = _scale_of(tl.load(amax_ptr), QMAX)
            if row == 0:
                tl.store(scale_ptr, scale)
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + start + offs, _quantize(x, scale, INT8), mask=start + offs < K)


@triton.jit
def scaled_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_scale_ptr,
    b_scale_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    A_PER_ROW: tl.constexpr,
    B_PER_COL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """c = (a @ b) * a_scale[:, None] * b_scale[None, :] (+ bias[None, :]); a @ b sums int8
    products exactly in int32, or e4m3 products (exact in fp32) in fp32."""
    ACC: tl.constexpr = tl.int32 if a_ptr.dtype.element_ty == tl.int8 else tl.float32
    # Grouped order: GROUP_M row-tiles walk the column tiles together, so the W tiles they share
    # are read from DRAM once and then from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap onto valid ones instead of being masked, so the loads
    # need no M/N mask; their results land in the tile's padding, which is never stored. Each
    # wrapped run still starts on a multiple of BLOCK_N, so the hints stay true.
    rm = offs_m % M
    rn = tl.max_contiguous(tl.multiple_of(offs_n % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rn[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # zeros past K add nothing to the sum
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Scale epilogue in fp32. An int32 sum converts exactly while |acc| < 2**24 (K <= 1040 at
    # full int8 range), and within fp32 rounding beyond; an fp32 sum is already fp32.
    y = acc.to(tl.float32)
    in_m = offs_m < M
    in_n = offs_n < N
    if A_PER_ROW:
        y = y * tl.load(a_scale_ptr + offs_m, mask=in_m, other=0.0)[:, None]
    else:
        y = y * tl.load(a_scale_ptr)
    if B_PER_COL:
        y = y * tl.load(b_scale_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    else:
        y = y * tl.load(b_scale_ptr)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
