"""Tiling, launch heuristics, ahead-of-time variants and cost model shared by the scaled GEMMs.

The int8 (W8A8) and fp8 (e4m3) families both multiply one-byte operands on tensor cores that take
32 values of K per instruction, so they share one tiling, one regime table and one cost model;
each family's ``spec`` adds its arch gate (sm_80+ for int8, sm_89+ for fp8). No triton import.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kompakt.codegen.aot import Variant
from kompakt.errors import CodegenError

KERNELS = "kompakt.codegen.scaled_matmul.kernel"

# Shared memory a block may use (the opt-in maximum), by compute capability: A100 164 KiB (less
# 1 KiB the driver keeps), sm_86/sm_89 consumer parts 100 KiB, H100/H200 228 KiB.
_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# Kept free for the epilogue's layout conversion scratch, which Triton does not always alias with
# the pipeline buffers; a 128x128 fp32 tile through shared memory in halves is 32 KiB.
_EPILOGUE_RESERVE = 32 * 1024


@dataclass(frozen=True)
class Config:
    """One tiling of ``y[M, N] = xq[M, K] @ wq[K, N]``: a program computes a block_m x block_n tile."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8  # programs sharing a band of rows, so their W tiles stay in L2
    num_warps: int = 4
    num_stages: int = 3

    def grid(self, m: int, n: int) -> tuple[int]:
        return (_cdiv(m, self.block_m) * _cdiv(n, self.block_n),)


@dataclass(frozen=True)
class QuantConfig:
    """Quantization: one program per row, reading it in chunks of block_k."""

    block_k: int
    num_warps: int

    def one_block(self, k: int) -> bool:
        """The whole row fits one chunk: read x once and keep it in registers."""
        return k <= self.block_k


def capability(arch: str) -> int:
    """``"sm_90"`` (or ``"sm_90a"``) -> 90."""
    found = re.fullmatch(r"sm_(\d+)a?", arch)
    if not found:
        raise CodegenError(f"arch must look like 'sm_80' or 'sm_90', got '{arch}'")
    return int(found.group(1))


def choose_tiling(m: int, n: int, k: int, cap: int) -> Config:
    """The tiling of an [m, k] x [k, n] one-byte product on compute capability ``cap``, by
    regime of m (the caller has checked the arch supports its operand type).

    int8 and fp8 MMA take 32 values of K per instruction (mma.sync m16n8k32, wgmma m64nNk32), so
    every block_k is a multiple of 32; 128 one-byte values are one 128-byte line per row.
    """
    if m <= 16:
        # Decode and tiny batches: the kernel streams W once and is bound by its bandwidth. 16 rows
        # is the smallest MMA tile, so it wastes least on padding; a narrow 32-column tile gives
        # N / 32 programs (128 at N = 4096) to cover the ~100-132 SMs; a deep 256 K step keeps
        # 8 KiB of W in flight per stage. Hopper's wgmma needs 64 rows, so this is mma.sync there.
        cfg = Config(16, 32, 256, group_m=1, num_warps=4, num_stages=4)
    elif m <= 64:
        # Small prefill / batched decode: one 64-row tile covers M; 64 rows is one wgmma
        # warpgroup (4 warps) on Hopper.
        cfg = Config(64, 128, 128, group_m=8, num_warps=4, num_stages=4)
    else:
        # Compute-bound prefill: 128x128 tiles (two warpgroups on Hopper) reuse each loaded byte
        # 128 times; grouped ordering keeps a band of W tiles hot in L2.
        cfg = Config(128, 128, 128, group_m=8, num_warps=8, num_stages=4)
    return _fit_stages(cfg, cap)


def choose_quant_config(k: int) -> QuantConfig:
    """Rows up to 4096 values are read once (4096 fp32 values = 32 per thread at 4 warps); longer
    rows are read twice in 4096-value chunks (amax, then quantize; the second read hits L2)."""
    block_k = min(max(16, 1 << max(0, k - 1).bit_length()), 4096)
    return QuantConfig(block_k=block_k, num_warps=4 if block_k <= 2048 else 8)


def cost(m: int, n: int, k: int, out_bytes: int = 2, has_bias: bool = False) -> tuple[int, int]:
    """(flops, bytes moved) of one matmul: one-byte operands once, fp32 scales, the output once."""
    flops = 2 * m * n * k
    moved = m * k + k * n + 4 * (m + n) + m * n * out_bytes + (n * out_bytes if has_bias else 0)
    return flops, moved


def quantize_bytes(m: int, k: int, in_bytes: int = 2) -> int:
    """Bytes moved by quantizing x [m, k]: x read once, one byte a value and an fp32 scale out."""
    return m * k * in_bytes + m * k + 4 * m


# Ahead-of-time variants are built for a 4096 x 4096 weight. Strides go in as constants (the JIT
# specializes unit strides and strides divisible by 16 at launch, which is what lets loads be
# 16-byte vectors); M, N and K go in as `Variant.int_args`, specialized the same way.
AOT_SHAPE = 4096


def matmul_signature(operand: str, out: str = "fp16", bias: str = "fp16") -> dict[str, str]:
    """Runtime argument types of `scaled_matmul_kernel` for ``operand`` ("i8" or "fp8e4nv")."""
    return {
        "a_ptr": f"*{operand}",
        "b_ptr": f"*{operand}",
        "c_ptr": f"*{out}",
        "a_scale_ptr": "*fp32",
        "b_scale_ptr": "*fp32",
        "bias_ptr": f"*{bias}",
        "M": "i32",
        "N": "i32",
        "K": "i32",
    }


def matmul_constants(cfg: Config, k: int = AOT_SHAPE, n: int = AOT_SHAPE) -> dict[str, int]:
    """Constexprs of `scaled_matmul_kernel` for a contiguous x [M, k], W [k, n] and y [M, n]."""
    return {
        "stride_am": k,
        "stride_ak": 1,
        "stride_bk": n,
        "stride_bn": 1,
        "stride_cm": n,
        "stride_cn": 1,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "GROUP_M": cfg.group_m,
        "EVEN_K": k % cfg.block_k == 0,
    }


def matmul_variants(
    arch: str, operand: str, choose_config: Callable[[int, int, int, str], Config]
) -> list[Variant]:
    """`scaled_matmul_kernel` on ``operand`` in each M regime, tiled by the family's heuristic."""
    variants = []
    for m in (1, 32, 512):  # one M per regime
        cfg = choose_config(m, AOT_SHAPE, AOT_SHAPE, arch)
        variants.append(
            Variant(
                f"{KERNELS}:scaled_matmul_kernel",
                matmul_signature(operand),
                {**matmul_constants(cfg), "A_PER_ROW": True, "B_PER_COL": True, "HAS_BIAS": True},
                arch=arch,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                int_args={"M": m, "N": AOT_SHAPE, "K": AOT_SHAPE},
            )
        )
    return variants


def quantize_variants(arch: str, out: str, cases: list[tuple[int, bool]]) -> list[Variant]:
    """`quantize_rows_kernel` writing ``out`` ("i8" or "fp8e4nv") for each (row length, per row)
    case, led by `row_amax_kernel` (the first pass of per-tensor scaling) when a case needs it."""
    x_types = {"x_ptr": "*fp16", "K": "i32"}
    variants = []
    for k, per_row in cases:
        quant = choose_quant_config(k)
        if not per_row:
            variants.append(
                Variant(
                    f"{KERNELS}:row_amax_kernel",
                    {**x_types, "amax_ptr": "*fp32"},
                    {"stride_xm": k, "BLOCK_K": quant.block_k},
                    arch=arch,
                    num_warps=quant.num_warps,
                    num_stages=1,
                    int_args={"K": k},
                )
            )
        variants.append(
            Variant(
                f"{KERNELS}:quantize_rows_kernel",
                {**x_types, "xq_ptr": f"*{out}", "scale_ptr": "*fp32", "amax_ptr": "*fp32"},
                {
                    "stride_xm": k,
                    "stride_qm": k,
                    "BLOCK_K": quant.block_k,
                    "ONE_BLOCK": quant.one_block(k),
                    "PER_ROW": per_row,
                },
                arch=arch,
                num_warps=quant.num_warps,
                num_stages=1,
                int_args={"K": k},
            )
        )
    return variants


def _fit_stages(cfg: Config, cap: int) -> Config:
    """Fewer pipeline stages where the A and B tiles of all stages would not fit shared memory."""
    per_stage = cfg.block_k * (cfg.block_m + cfg.block_n)  # int8 / fp8: one byte a value
    # An arch not in the table gets the smallest budget: fewer stages run slower, too many fail.
    budget = _SHARED_BYTES.get(cap, min(_SHARED_BYTES.values())) - _EPILOGUE_RESERVE
    stages = max(2, min(cfg.num_stages, budget // per_stage))
    if stages == cfg.num_stages:
        return cfg
    return Config(cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, cfg.num_warps, stages)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
