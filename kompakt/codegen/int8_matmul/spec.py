"""Heuristics of the int8 (W8A8) matmul family: sm_80+ gate, int8 AOT variants, quantize cost.

What int8 shares with fp8 (the tile `Config` and its regimes, `QuantConfig` and
`choose_quant_config`, the GEMM `cost`) is written once in `kompakt.codegen.scaled_matmul.spec`
and re-exported here. No triton import: planners use these without a GPU toolchain.
"""

from __future__ import annotations

from kompakt.codegen.aot import Variant
from kompakt.codegen.scaled_matmul import spec as shared
from kompakt.codegen.scaled_matmul.spec import AOT_SHAPE, Config, capability
from kompakt.codegen.scaled_matmul.spec import QuantConfig as QuantConfig
from kompakt.codegen.scaled_matmul.spec import choose_quant_config as choose_quant_config
from kompakt.codegen.scaled_matmul.spec import cost as cost
from kompakt.errors import CodegenError


def choose_config(m: int, n: int, k: int, arch: str = "sm_90") -> Config:
    """The tiling for an [m, k] x [k, n] int8 product on ``arch`` (sm_80+), by regime of m; see
    `scaled_matmul.spec.choose_tiling` (int8 MMA is mma.sync m16n8k32.s8, wgmma m64nNk32.s8)."""
    cap = capability(arch)
    if cap < 80:
        raise CodegenError(f"int8 matmul kernels target sm_80 or newer (int8 mma.sync), got {arch}")
    return shared.choose_tiling(m, n, k, cap)


def quantize_cost(m: int, k: int, in_bytes: int = 2) -> tuple[int, int]:
    """(flops, bytes moved) of per-token quantization: abs/max, divide, round, clamp per value."""
    return 5 * m * k, shared.quantize_bytes(m, k, in_bytes)


def matmul_signature(out: str = "fp16", bias: str = "fp16") -> dict[str, str]:
    """Runtime argument types of `scaled_matmul_kernel` on int8 operands."""
    return shared.matmul_signature("i8", out, bias)


def aot_variants(arch: str) -> list[Variant]:
    """The kernels tests compile for ``arch``: per-token quantization of a row read once and of
    one read in two passes, and the int8 matmul in each M regime."""
    quant = shared.quantize_variants(arch, "i8", [(AOT_SHAPE, True), (2 * AOT_SHAPE, True)])
    return quant + shared.matmul_variants(arch, "i8", choose_config)
