"""Launchers shared by the int8 and fp8 matmul families: input checks, allocation, grid, launch.

Each family's public launcher fixes the operand type and its arch gate and calls these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kompakt.codegen.devices import exact_arch
from kompakt.codegen.scaled_matmul.kernel import (
    quantize_rows_kernel,
    row_amax_kernel,
    scaled_matmul_kernel,
)
from kompakt.codegen.scaled_matmul.spec import Config, choose_quant_config
from kompakt.errors import CodegenError

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def quantize_rows(
    x: torch.Tensor, q_dtype: torch.dtype, per_row: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] fp16/bf16/fp32 -> (xq q_dtype [..., K], scale fp32 [...] if per_row else []),
    q_dtype int8 (scale = amax / 127) or float8_e4m3fn (scale = amax / 448)."""
    if x.dtype not in _X_DTYPES:
        raise CodegenError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() < 1:
        raise CodegenError(f"x must be [..., K], got shape {list(x.shape)}")
    lead, k = tuple(x.shape[:-1]), x.shape[-1]
    rows = x.reshape(-1, k)
    if k > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    xq = torch.empty((m, k), dtype=q_dtype, device=x.device)
    f32 = {"dtype": torch.float32, "device": x.device}
    # A per-tensor scale stays 1 when there are no rows: what the reference gives for amax 0.
    scale = torch.empty(lead, **f32) if per_row else torch.ones((), **f32)
    amax = scale if per_row else torch.zeros(1, **f32)  # atomic max starts at 0
    if m:
        cfg = choose_quant_config(k)
        if not per_row:
            row_amax_kernel[(m,)](
                rows, k, amax, rows.stride(0), BLOCK_K=cfg.block_k, num_warps=cfg.num_warps
            )
        quantize_rows_kernel[(m,)](
            rows,
            k,
            xq,
            scale,
            amax,  # read only per tensor
            rows.stride(0),
            xq.stride(0),
            BLOCK_K=cfg.block_k,
            ONE_BLOCK=cfg.one_block(k),
            PER_ROW=per_row,
            num_warps=cfg.num_warps,
        )
    return xq.reshape(*lead, k), scale


def launch_scaled_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    operand: torch.dtype,
    choose_config: Callable[[int, int, int, str], Config],
    config: Config | None,
    arch: str | None,
) -> torch.Tensor:
    """y [..., N] = (xq [..., K] @ wq [K, N]) * x_scale * w_scale (+ bias), as out_dtype.

    xq and wq must be ``operand`` (int8 or float8_e4m3fn); x_scale fp32 [...] or []; w_scale fp32
    [N] or []; bias [N] of any float dtype. ``config`` overrides ``choose_config(m, n, k, arch)``,
    the family's heuristic; ``arch`` defaults to the device's (sm_90 on CPU).
    """
    for name, t in (("xq", xq), ("wq", wq)):
        if t.dtype != operand:
            raise CodegenError(f"{name} must be {operand}, got {t.dtype} of shape {list(t.shape)}")
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
    if out_dtype not in OUT_DTYPES:
        raise CodegenError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m and n:
        cfg = config or choose_config(m, n, k, arch or device_arch(xq))
        scaled_matmul_kernel[cfg.grid(m, n)](
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


def device_arch(t: torch.Tensor) -> str:
    """The arch of the GPU ``t`` lives on; sm_90 on the CPU (the interpreter only exercises the
    tiling there)."""
    return exact_arch(t.device)


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
