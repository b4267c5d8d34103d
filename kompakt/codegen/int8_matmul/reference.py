"""Torch reference of the int8 (W8A8) matmul family: what the kernels must compute.

Quantization is symmetric, 127 levels each side (-128 is never produced, so negating a value never
overflows), rounding half to even as torch.round does. The matmul reference dequantizes both
operands and multiplies in fp32; the kernel instead sums exact int32 products and scales once,
which agrees to fp32 rounding.
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq int8 [..., K], scale fp32 [...]); scale = max|row| / 127, 1 for zeros."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] else xf.new_zeros(xf.shape[:-1])
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    xq = torch.round(xf / scale.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)
    return xq, scale


def quantize_weight_reference(
    w: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] float -> (wq int8 [K, N], scale fp32 [N], or [] when not per_channel)."""
    wf = w.float()
    amax = wf.abs().amax(dim=0) if per_channel else wf.abs().amax()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    wq = torch.round(wf / scale).clamp(-QMAX, QMAX).to(torch.int8)
    return wq, scale


def int8_matmul_reference(
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
