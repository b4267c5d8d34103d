"""Launch configurations, the shape heuristic, AOT variants and the cost of the GLU kernel.

No triton import here: the backend and the cost model read this module on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant

KERNEL = "kompakt.codegen.glu.kernel:glu_kernel"
KINDS = ("silu", "gelu", "gelu_tanh")

# Streaming multiprocessors: A100 108, H100/H200 SXM 132 (see norm/spec.py).
SMS = {"sm_80": 108, "sm_90": 132}

# Output elements per program: 16 per thread at 4 warps, i.e. two 16-byte fp16 vectors of gate
# and two of up in flight per thread, enough to cover DRAM latency on an elementwise op.
TILE_ELEMENTS = 2048
MAX_BLOCK_F = 1024
# Narrowest column block: 8 fp16 (one 16-byte vector) per thread at one warp.
MIN_BLOCK_F = 256

# Flops per output element, a transcendental counted as one: silu = neg, exp, add, div, two
# multiplies; gelu = scale, erf, add, two multiplies, times up; gelu_tanh = cube, fma, scale,
# sigmoid (neg, exp, add, div), two multiplies.
FLOPS_PER_ELEMENT = {"silu": 6, "gelu": 6, "gelu_tanh": 10}


@dataclass(frozen=True)
class Config:
    """How one GLU launch is tiled.

    Attributes:
        block_m: Rows per program (a power of two).
        block_f: Columns per program (a power of two).
        num_warps: Warps per program.
        num_stages: Software-pipelining depth (no loops: 1).
    """

    block_m: int
    block_f: int
    num_warps: int = 4
    num_stages: int = 1


def choose_config(n_rows: int, f: int, arch: str = "sm_90") -> Config:
    """~2048 outputs per program; narrower column blocks when too few programs would run.

    Prefill (many rows): 2 rows x 1024 columns. Decode (a handful of rows): the column block
    shrinks (down to 256) so that F = 11008 still spreads over more SMs than 11 programs would.
    """
    block_f = min(MAX_BLOCK_F, _next_pow2(f))
    block_m = min(_next_pow2(n_rows), max(1, TILE_ELEMENTS // block_f))
    target = 2 * SMS.get(arch, 132)
    while block_f > MIN_BLOCK_F and _programs(n_rows, f, block_m, block_f) < target:
        block_f //= 2
    num_warps = min(8, max(1, block_m * block_f // 512))
    return Config(block_m=block_m, block_f=block_f, num_warps=num_warps)


def cost(n_rows: int, f: int, kind: str = "silu", *, itemsize: int = 2) -> tuple[int, int]:
    """``(flops, bytes_moved)``: gate and up read once, out written once."""
    return FLOPS_PER_ELEMENT[kind] * n_rows * f, 3 * n_rows * f * itemsize


def aot_variants(arch: str) -> list[Variant]:
    """Llama-7B's F = 11008 (fp16, prefill) for every kind, decode (M = 1) and fp32 SwiGLU."""
    cases = [
        # (dtype, kind, n_rows, f)
        ("fp16", "silu", 4096, 11008),
        ("fp16", "gelu", 4096, 11008),
        ("fp16", "gelu_tanh", 4096, 11008),
        ("fp16", "silu", 1, 11008),
        ("fp32", "silu", 4096, 11008),
    ]
    variants = []
    for dtype, kind, n_rows, f in cases:
        config = choose_config(n_rows, f, arch)
        variants.append(
            Variant(
                KERNEL,
                signature(dtype),
                constants={"KIND": kind, "BLOCK_M": config.block_m, "BLOCK_F": config.block_f},
                arch=arch,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                # gate and up are the halves of one merged [n_rows, 2F] GEMM output
                int_args={"n_rows": n_rows, "F": f, "stride_gate": 2 * f, "stride_up": 2 * f},
            )
        )
    return variants


def signature(dtype: str) -> dict[str, str]:
    """Triton argument types of `glu_kernel` for inputs of ``dtype``."""
    ptr = f"*{dtype}"
    return {
        "gate_ptr": ptr,
        "up_ptr": ptr,
        "out_ptr": ptr,
        "n_rows": "i32",
        "F": "i32",
        "stride_gate": "i32",
        "stride_up": "i32",
    }


def _programs(n_rows: int, f: int, block_m: int, block_f: int) -> int:
    return -(-n_rows // block_m) * -(-f // block_f)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
