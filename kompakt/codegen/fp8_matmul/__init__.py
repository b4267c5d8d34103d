"""fp8 (e4m3) matmul for sm_89+: float8_e4m3fn activations times float8_e4m3fn weights.

    xq, x_scale = quantize_fp8(x, per_row)     x [..., K] fp16/bf16/fp32
        x_scale = amax / 448 (per row, or of the whole tensor; 1 when amax is 0)
        xq = round_half_even(clamp(x / x_scale, -448, 448)) as float8_e4m3fn
    y = (xq @ wq) * x_scale[..., None] * w_scale[None, :] (+ bias)

``xq @ wq`` runs on fp8 tensor cores (wgmma on sm_90) with fp32 accumulation; the scales and
bias are applied in fp32 in the epilogue and y is stored as fp16, bf16 or fp32. Shapes: xq
[..., K], x_scale fp32 [...] (per row) or [] (per tensor), wq [K, N] (MatMul orientation),
w_scale fp32 [N] (per output channel) or [], bias [N]. Below sm_89 there is no fp8 MMA:
`choose_config` and the launchers raise CodegenError there.

``launch_quantize_fp8`` and ``launch_fp8_matmul`` (in `kernel`, which needs triton) run the
kernels; this package imports without triton. The Triton kernels, the tiling heuristics and the
matmul reference are shared with ``int8_matmul`` in ``kompakt.codegen.scaled_matmul``.
"""

from kompakt.codegen.fp8_matmul.reference import (
    fp8_matmul_reference,
    quantize_fp8_reference,
    quantize_fp8_weight_reference,
)
from kompakt.codegen.fp8_matmul.spec import (
    Config,
    QuantConfig,
    aot_variants,
    choose_config,
    choose_quant_config,
    cost,
    quantize_cost,
    require_fp8,
)

__all__ = [
    "Config",
    "QuantConfig",
    "aot_variants",
    "choose_config",
    "choose_quant_config",
    "cost",
    "fp8_matmul_reference",
    "launch_fp8_matmul",
    "launch_quantize_fp8",
    "quantize_cost",
    "quantize_fp8_reference",
    "quantize_fp8_weight_reference",
    "require_fp8",
]


def __getattr__(name: str):
    # The launchers live with the kernels, which import triton: load them on first use only.
    if name in ("launch_fp8_matmul", "launch_quantize_fp8"):
        from kompakt.codegen.fp8_matmul import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
