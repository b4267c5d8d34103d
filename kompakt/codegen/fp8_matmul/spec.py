"""fp8 (e4m3) matmul spec: the sm_89+ gate, the e4m3 AOT variants and the quantize cost.

`Config`, `QuantConfig`, the regimes behind `choose_config`, `choose_quant_config` and the matmul
`cost` are the int8 family's too, and are defined once in `kompakt.codegen.scaled_matmul.spec`
(re-exported here). Planners call these without a GPU toolchain, so nothing here imports triton.
"""

from __future__ import annotations

from kompakt.codegen.aot import Variant
from kompakt.codegen.scaled_matmul import spec as shared
from kompakt.codegen.scaled_matmul.spec import AOT_SHAPE, Config, capability
from kompakt.codegen.scaled_matmul.spec import QuantConfig as QuantConfig
from kompakt.codegen.scaled_matmul.spec import choose_quant_config as choose_quant_config
from kompakt.codegen.scaled_matmul.spec import cost as cost
from kompakt.errors import CodegenError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
MIN_CAPABILITY = 89  # fp8 tensor-core MMA: Ada (sm_89) mma.sync e4m3, Hopper (sm_90) wgmma


def require_fp8(arch: str) -> int:
    """The compute capability of ``arch`` (``"sm_90"`` -> 90); CodegenError below sm_89."""
    cap = capability(arch)
    if cap < MIN_CAPABILITY:
        raise CodegenError(
            f"fp8 matmul needs sm_89+ (fp8 tensor cores: Ada sm_89, Hopper sm_90), got {arch}; "
            "use the int8 (W8A8) kernels there"
        )
    return cap


def choose_config(m: int, n: int, k: int, arch: str = "sm_90") -> Config:
    """The tiling for an [m, k] x [k, n] fp8 product on ``arch`` (sm_89+), by regime of m; see
    `scaled_matmul.spec.choose_tiling` (fp8 MMA is wgmma m64nNk32, mma.sync m16n8k32 on sm_89)."""
    return shared.choose_tiling(m, n, k, require_fp8(arch))


def quantize_cost(m: int, k: int, in_bytes: int = 2) -> tuple[int, int]:
    """(flops, bytes moved) of quantization: abs/max, divide, clamp, round onto e4m3 per value."""
    return 8 * m * k, shared.quantize_bytes(m, k, in_bytes)


def matmul_signature(out: str = "fp16", bias: str = "fp16") -> dict[str, str]:
    """Runtime argument types of `scaled_matmul_kernel` on e4m3 operands."""
    return shared.matmul_signature("fp8e4nv", out, bias)


def aot_variants(arch: str) -> list[Variant]:
    """The kernels tests compile for ``arch`` (sm_89+): quantization per row and per tensor (with
    its amax pass), and the fp8 matmul in each M regime."""
    require_fp8(arch)
    quant = shared.quantize_variants(arch, "fp8e4nv", [(AOT_SHAPE, True), (AOT_SHAPE, False)])
    return quant + shared.matmul_variants(arch, "fp8e4nv", choose_config)
