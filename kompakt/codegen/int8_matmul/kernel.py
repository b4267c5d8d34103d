"""Triton kernels of the int8 (W8A8) matmul family, and the launchers that check and run them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kompakt.codegen.int8_matmul.spec import Config, choose_config, choose_quant_config
from kompakt.errors import CodegenError

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _round_half_even(t):
    # Adding 1.5 * 2**23 leaves no fraction bits in an fp32 mantissa, so the add itself rounds to
    # an integer, half to even (IEEE default), like torch.round; exact for |t| < 2**22. Written out
    # because the interpreter has no libdevice rint.
    return (t + 12582912.0) - 12582912.0


@triton.jit
def _scale_of(amax):
    # div_rn: IEEE division, as torch does; a plain `/` may be approximate on the GPU.
    return tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)


@triton.jit
def _to_int8(x, scale):
    q = _round_half_even(tl.math.div_rn(x, scale))
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def quantize_per_token_kernel(
    x_ptr,
    xq_ptr,
    scale_ptr,
    K,
    stride_xm,
    stride_qm,
    BLOCK_K: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """Row ``pid`` of x [M, K] -> xq int8 and scale = max|row| / 127 (1 for an all-zero row)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = xq_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:  # the row fits: read it once, keep it in registers
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(x), axis=0))
        tl.store(q_row + offs, _to_int8(x, scale), mask=offs < K)
        tl.store(scale_ptr + row, scale)
    else:  # two passes: amax, then quantize (the second read mostly hits L2)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = _scale_of(tl.max(amax, axis=0))
        for start in range(0, K, BLOCK_K):
            x = tl.load(x_row + start + offs, mask=start + offs < K, other=0.0).to(tl.float32)
            tl.store(q_row + start + offs, _to_int8(x, scale), mask=start + offs < K)
        tl.store(scale_ptr + row, scale)


@triton.jit
def int8_matmul_kernel(
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
    """c = (a @ b in int32) * a_scale[:, None] * b_scale[None, :] (+ bias[None, :])."""
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # zeros past K add nothing to the sum
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Scale epilogue in fp32; int32 -> fp32 is exact while |acc| < 2**24 (K <= 1040 at full
    # range), and within fp32 rounding beyond.
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


def launch_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization: x [..., K] float -> (xq int8 [..., K], scale fp32
    [...]) with scale = max|row| / 127 (1 for an all-zero row), xq = round_half_even(x / scale)."""
    if not x.is_floating_point() or x.element_size() > 4:
        raise CodegenError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() < 1:
        raise CodegenError(f"x must be [..., K], got shape {list(x.shape)}")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    rows = x.reshape(-1, k)
    if k > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        cfg = choose_quant_config(k)
        quantize_per_token_kernel[(m,)](
            rows,
            xq,
            scale,
            k,
            rows.stride(0),
            xq.stride(0),
            BLOCK_K=cfg.block_k,
            ONE_BLOCK=cfg.one_block(k),
            num_warps=cfg.num_warps,
        )
    return xq.reshape(*lead, k), scale.reshape(lead)


def launch_int8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: Config | None = None,
    arch: str | None = None,
) -> torch.Tensor:
    """y [..., N] = (xq [..., K] @ wq [K, N], in int32) * x_scale * w_scale (+ bias), as out_dtype.

    x_scale is fp32 [...] (per token) or [] (per tensor); w_scale fp32 [N] (per output channel)
    or [] (per tensor); bias [N] of any float dtype. ``config`` overrides the heuristic tiling;
    ``arch`` (default: the device's, sm_90 on CPU) picks it.
    """
    _check_operand("xq", xq, torch.int8)
    _check_operand("wq", wq, torch.int8)
    if xq.dim() < 1 or wq.dim() != 2:
        raise CodegenError(
            f"xq must be [..., K] and wq [K, N]; got xq {list(xq.shape)}, wq {list(wq.shape)}"
        )
    lead, k = tuple(xq.shape[:-1]), xq.shape[-1]
    if wq.shape[0] != k:
        raise CodegenError(f"xq [..., {k}] and wq {list(wq.shape)} disagree on K")
    n = wq.shape[1]
    a = xq.reshape(-1, k)
    m = a.shape[0]
    a_scale = _check_scale("x_scale", x_scale, lead, xq)
    b_scale = _check_scale("w_scale", w_scale, (n,), xq)
    if bias is not None:
        if not bias.is_floating_point() or tuple(bias.shape) != (n,):
            raise CodegenError(f"bias must be a float [{n}], got {bias.dtype} {list(bias.shape)}")
        _check_device("bias", bias, xq)
        bias = bias.contiguous()
    if out_dtype not in _OUT_DTYPES:
        raise CodegenError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m and n:
        cfg = config or choose_config(m, n, k, arch or _device_arch(xq))
        int8_matmul_kernel[cfg.grid(m, n)](
            a,
            wq,
            out,
            a_scale,
            b_scale,
            out if bias is None else bias,  # never read without bias
            m,
            n,
            k,
            a.stride(0),
            a.stride(1),
            wq.stride(0),
            wq.stride(1),
            out.stride(0),
            out.stride(1),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m,
            EVEN_K=k % cfg.block_k == 0,
            A_PER_ROW=a_scale.dim() == 1,
            B_PER_COL=b_scale.dim() == 1,
            HAS_BIAS=bias is not None,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out.reshape(*lead, n)


def _check_operand(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise CodegenError(f"{name} must be {dtype}, got {t.dtype} of shape {list(t.shape)}")


def _check_scale(name: str, s: torch.Tensor, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A per-row/per-column scale of ``shape`` (returned flat), or a per-tensor scale []."""
    if s.dtype != torch.float32:
        raise CodegenError(f"{name} must be float32, got {s.dtype}")
    if s.dim() != 0 and tuple(s.shape) != shape:
        raise CodegenError(f"{name} must be {list(shape)} or [] (per tensor), got {list(s.shape)}")
    _check_device(name, s, like)
    return s.contiguous() if s.dim() == 0 else s.reshape(-1).contiguous()


def _check_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise CodegenError(f"{name} is on {t.device} but xq is on {like.device}")


def _device_arch(t: torch.Tensor) -> str:
    if t.is_cuda:
        major, minor = torch.cuda.get_device_capability(t.device)
        return f"sm_{major}{minor}"
    return "sm_90"  # the interpreter runs on the CPU; the tiling is then only exercised
