"""int8 (W8A8) matmul: per-token int8 activations times per-channel int8 weights.

    xq, x_scale = quantize_per_token(x)        x [..., K] fp16/bf16/fp32
        x_scale = max|x_row| / 127 (1 for an all-zero row), xq = clamp(round(x / x_scale), +-127)
    y = (xq @ wq) * x_scale[..., None] * w_scale[None, :] (+ bias)

``xq @ wq`` is an exact int32 product (int8 tensor cores: mma.sync on sm_80, wgmma on sm_90);
the scales and bias are applied in fp32 in the kernel's epilogue, and y is stored as fp16, bf16 or
fp32. Shapes: xq int8 [..., K], x_scale fp32 [...] (per token) or [] (static per tensor), wq int8
[K, N] (MatMul orientation), w_scale fp32 [N] (per output channel) or [], bias [N].

``launch_quantize_per_token`` and ``launch_int8_matmul`` (in `kernel`, which needs triton) run the
kernels; this package imports without triton. The Triton kernels, the tiling heuristics and the
matmul reference are shared with ``fp8_matmul`` in ``kompakt.codegen.scaled_matmul``.
"""

from kompakt.codegen.int8_matmul.reference import (
    int8_matmul_reference,
    quantize_per_token_reference,
    quantize_weight_reference,
)
from kompakt.codegen.int8_matmul.spec import (
    Config,
    QuantConfig,
    aot_variants,
    choose_config,
    choose_quant_config,
    cost,
    quantize_cost,
)

__all__ = [
    "Config",
    "QuantConfig",
    "aot_variants",
    "choose_config",
    "choose_quant_config",
    "cost",
    "int8_matmul_reference",
    "launch_int8_matmul",
    "launch_quantize_per_token",
    "quantize_cost",
    "quantize_per_token_reference",
    "quantize_weight_reference",
]


def __getattr__(name: str):
    # The launchers live with the kernels, which import triton: load them on first use only.
    if name in ("launch_int8_matmul", "launch_quantize_per_token"):
        from kompakt.codegen.int8_matmul import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
