"""Rotary kernels: rotary position embedding in Hugging Face's (GPT-NeoX) convention.

    out[..., :R] = x[..., :R] * cos + rotate_half(x[..., :R]) * sin,   R = cos.shape[-1] <= D
    out[..., R:] = x[..., R:]
    rotate_half(v) = cat(-v[..., R/2:], v[..., :R/2])

x is [B, H, S, D] (fp16 / bf16 / fp32, any batch/head/position strides); cos and sin are
[B or 1, S, R] (also [S, R] or [B or 1, 1, S, R]). The math is fp32; out is a contiguous
[B, H, S, D] in x's dtype. The launcher is `kompakt.codegen.rotary.kernel.launch_rotary`
(importing that module needs triton); this package itself does not import triton.
"""

from kompakt.codegen.rotary.reference import rotary_reference
from kompakt.codegen.rotary.spec import Config, aot_variants, choose_config, cost

__all__ = ["Config", "aot_variants", "choose_config", "cost", "rotary_reference"]
