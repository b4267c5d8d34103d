"""Torch reference of the fp8 (e4m3) matmul family: what the kernels must compute.

Quantization scales x so its largest magnitude lands on 448 (the largest finite float8_e4m3fn),
clamps, and rounds to nearest even (torch's cast). The matmul reference dequantizes both operands
and multiplies in fp32; the kernel sums exact fp8 x fp8 products in fp32 and scales once, which
agrees to fp32 rounding.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _scale_of(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _quantize(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_fp8_reference(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq float8_e4m3fn [..., K], scale fp32 [...] per row, or [] per tensor)."""
    xf = x.float()
    if per_row:
        amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
        scale = _scale_of(amax)
        return _quantize(xf, scale.unsqueeze(-1)), scale
    scale = _scale_of(xf.abs().max() if xf.numel() else xf.new_zeros(()))
    return _quantize(xf, scale), scale


def quantize_fp8_weight_reference(
    w: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] float -> (wq float8_e4m3fn [K, N], scale fp32 [N], or [] when not per_channel)."""
    wf = w.float()
    scale = _scale_of(wf.abs().amax(dim=0) if per_channel else wf.abs().amax())
    return _quantize(wf, scale), scale


def fp8_matmul_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale) + bias`` in fp32, cast to out_dtype; y [..., N]."""
    xs = x_scale.float()
    x = xq.float() * (xs.unsqueeze(-1) if xs.dim() else xs)
    w = wq.float() * w_scale.float()  # [N] broadcasts over the columns of [K, N]
    y = x @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
