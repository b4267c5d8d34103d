"""What the int8 (W8A8) and fp8 (e4m3) matmul families share: a scaled one-byte GEMM.

    xq, x_scale = quantize(x)            x [..., K] fp16/bf16/fp32; x_scale = amax / QMAX per row
                                         (or per tensor), 1 where amax is 0
    y = (xq @ wq) * x_scale[..., None] * w_scale[None, :] (+ bias)

xq [..., K] and wq [K, N] are both int8 (QMAX 127, exact int32 accumulation) or both
float8_e4m3fn (QMAX 448, fp32 accumulation); x_scale is fp32 [...] or [], w_scale fp32 [N] or [],
bias [N]; y is fp16, bf16 or fp32, scaled in fp32 in the kernel's epilogue.

This is not a family of its own: ``kompakt.codegen.int8_matmul`` and ``kompakt.codegen.fp8_matmul``
are, and their public functions call into here. ``spec`` holds the shared tiling, regimes, cost
model and AOT variant builders, ``reference`` the shared torch semantics; ``kernel`` (the Triton
kernels) and ``launch`` (their checked launchers) need triton and are not imported here.
"""

from kompakt.codegen.scaled_matmul.reference import (
    absmax_quantize,
    absmax_scale,
    scaled_matmul_reference,
)
from kompakt.codegen.scaled_matmul.spec import (
    AOT_SHAPE,
    Config,
    QuantConfig,
    capability,
    choose_quant_config,
    choose_tiling,
    cost,
)

__all__ = [
    "AOT_SHAPE",
    "Config",
    "QuantConfig",
    "absmax_quantize",
    "absmax_scale",
    "capability",
    "choose_quant_config",
    "choose_tiling",
    "cost",
    "scaled_matmul_reference",
]
