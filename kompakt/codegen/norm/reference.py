"""Torch reference of the norm family: what every norm kernel variant must compute.

    summed = x + residual                 (in x's dtype, when a residual is given)
    RMSNorm:   y = summed / sqrt(mean(summed^2) + eps) * weight
    LayerNorm: y = (summed - mean) / sqrt(var + eps) * weight + bias     (biased variance)

The statistics, the normalization and the affine step are all fp32; y is cast to x's dtype once,
at the end. The sum is rounded to x's dtype *before* it is normalized, so the fused kernel equals
the unfused "add, then norm" a transformer runs in x's dtype.
"""

from __future__ import annotations

import torch


def _summed(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x if residual is None else (x.float() + residual.float()).to(x.dtype)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; ``(y, x + residual)`` when a residual is given."""
    summed = _summed(x, residual)
    h = summed.float()
    y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, summed)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim (biased variance); ``(y, x + residual)`` with a residual."""
    summed = _summed(x, residual)
    h = summed.float()
    mean = h.mean(dim=-1, keepdim=True)
    var = (h - mean).pow(2).mean(dim=-1, keepdim=True)
    y = (h - mean) * torch.rsqrt(var + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, summed)
