"""Torch reference of the int8 (W8A8) matmul family: what the kernels must compute.

Quantization is symmetric, 127 levels each side (-128 is never produced, so negating a value never
overflows), rounding half to even as torch.round does. The absmax scaling and the matmul
(`int8_matmul_reference`, the fp8 family's too) come from `kompakt.codegen.scaled_matmul`.
"""

from __future__ import annotations

import torch

from kompakt.codegen.scaled_matmul.reference import absmax_quantize, scaled_matmul_reference

QMAX = 127

# ``(xq * x_scale) @ (wq * w_scale) + bias`` in fp32, cast to out_dtype: the kernel sums exact
# int32 products and scales once, which agrees to fp32 rounding.
int8_matmul_reference = scaled_matmul_reference


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq int8 [..., K], scale fp32 [...]); scale = max|row| / 127, 1 for zeros."""
    return absmax_quantize(x, QMAX, -1, _to_int8)


def quantize_weight_reference(
    w: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] float -> (wq int8 [K, N], scale fp32 [N], or [] when not per_channel)."""
    return absmax_quantize(w, QMAX, 0 if per_channel else None, _to_int8)


def _to_int8(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t).clamp(-QMAX, QMAX).to(torch.int8)
