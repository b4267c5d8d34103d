"""Torch reference of the fp8 (e4m3) matmul family: what the kernels must compute.

Quantization scales x so its largest magnitude lands on 448 (the largest finite float8_e4m3fn),
clamps, and rounds to nearest even (torch's cast). The absmax scaling and the matmul
(`fp8_matmul_reference`, the int8 family's too) come from `kompakt.codegen.scaled_matmul`.
"""

from __future__ import annotations

import torch

from kompakt.codegen.scaled_matmul.reference import absmax_quantize, scaled_matmul_reference

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0

# ``(xq * x_scale) @ (wq * w_scale) + bias`` in fp32, cast to out_dtype: the kernel sums exact
# fp8 x fp8 products in fp32 and scales once, which agrees to fp32 rounding.
fp8_matmul_reference = scaled_matmul_reference


def quantize_fp8_reference(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (xq float8_e4m3fn [..., K], scale fp32 [...] per row, or [] per tensor)."""
    return absmax_quantize(x, FP8_MAX, -1 if per_row else None, _to_fp8)


def quantize_fp8_weight_reference(
    w: torch.Tensor, per_channel: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [K, N] float -> (wq float8_e4m3fn [K, N], scale fp32 [N], or [] when not per_channel)."""
    return absmax_quantize(w, FP8_MAX, 0 if per_channel else None, _to_fp8)


def _to_fp8(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-FP8_MAX, FP8_MAX).to(FP8)
