"""Norm kernels: RMSNorm and LayerNorm over the last dim, with an optional fused residual add.

    summed = x + residual                                  (optional; returned, in x's dtype)
    RMSNorm:   y = summed * rsqrt(mean(summed^2) + eps) * weight
    LayerNorm: y = (summed - mean) * rsqrt(var + eps) * weight + bias   (biased variance)

x is [..., D] (fp16 / bf16 / fp32, rows with unit feature stride), weight and bias [D]. Statistics
and the affine step are fp32; y is x's dtype. The launchers are
`kompakt.codegen.norm.kernel.launch_rms_norm` and ``launch_layer_norm`` (importing that module
needs triton); this package itself does not import triton.
"""

from kompakt.codegen.norm.reference import layer_norm_reference, rms_norm_reference
from kompakt.codegen.norm.spec import Config, aot_variants, choose_config, cost

__all__ = [
    "Config",
    "aot_variants",
    "choose_config",
    "cost",
    "layer_norm_reference",
    "rms_norm_reference",
]
