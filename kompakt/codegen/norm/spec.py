"""Launch configurations, the shape heuristic, AOT variants and the cost of the norm kernels.

No triton import here: the backend and the cost model read this module on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant

KERNEL = "kompakt.codegen.norm.kernel:norm_kernel"

# Streaming multiprocessors per GPU: A100 has 108, H100/H200 SXM have 132. A launch wants at least
# a couple of programs per SM so that one program's reduction overlaps another's loads.
SMS = {"sm_80": 108, "sm_90": 132}

# Rows up to this many features are held in registers whole (one read of x). At 16 warps that is
# 32 fp32 values of x per thread plus as many of the weight: well under the 255-register cap.
# Longer rows are streamed in MAX_ONE_BLOCK // 4 chunks, 2 (RMS) or 3 (LayerNorm) passes.
MAX_ONE_BLOCK = 16384
CHUNK = 4096

# A tile of about this many elements per program: 16 per thread at 4 warps, i.e. two 16-byte
# vector loads of fp16 in flight per thread, enough to cover DRAM latency on a memory-bound op.
TILE_ELEMENTS = 2048


@dataclass(frozen=True)
class Config:
    """How one norm launch is tiled.

    Attributes:
        block_d: Features per tile (a power of two); the whole row when it is >= D.
        rows: Rows per program (a power of two); > 1 only for short rows.
        num_warps: Warps per program.
        num_stages: Software-pipelining depth (1: the only loops are the chunked passes).
    """

    block_d: int
    rows: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def one_block(self, d: int) -> bool:
        """Whether a row of ``d`` features fits one tile (kept in registers, read once)."""
        return self.block_d >= d


def choose_config(n_rows: int, d: int, arch: str = "sm_90") -> Config:
    """The launch heuristic: tile a row whole when it fits, pack short rows, keep SMs busy."""
    if d > MAX_ONE_BLOCK:
        # Streaming regime (rare: hidden sizes above 16k): fixed chunks, one row per program.
        return Config(block_d=CHUNK, rows=1, num_warps=8)
    block_d = _next_pow2(d)
    rows = 1
    if block_d < TILE_ELEMENTS:
        # Short rows (D <= 1024, e.g. per-head q/k norms): several rows per program so that each
        # program moves a useful amount, but never so many that fewer than 2 programs per SM run.
        rows = TILE_ELEMENTS // block_d
        rows = min(rows, max(1, _prev_pow2(n_rows // (2 * SMS.get(arch, 132)))))
    # About 16 elements per thread; 16 warps (512 threads) at most for D = 8192..16384.
    num_warps = min(16, max(1, rows * block_d // 512))
    return Config(block_d=block_d, rows=rows, num_warps=num_warps)


def cost(
    n_rows: int, d: int, *, layer_norm: bool = False, residual: bool = False, itemsize: int = 2
) -> tuple[int, int]:
    """``(flops, bytes_moved)`` of one launch, for the cost model.

    Flops per element: RMSNorm squares and adds (2), scales by rstd and weight (2); LayerNorm also
    subtracts the mean (1) and adds the bias (1); the residual add is 1 more. Bytes: x read and y
    written once (the chunked regime re-reads x from L2, not counted), the weight (and bias) once,
    and with a residual: residual read and the sum written.
    """
    per_element = (6 if layer_norm else 4) + (1 if residual else 0)
    flops = per_element * n_rows * d
    params = (2 if layer_norm else 1) * d * itemsize
    activations = (4 if residual else 2) * n_rows * d * itemsize
    return flops, activations + params


def aot_variants(arch: str) -> list[Variant]:
    """The variants the tests compile: Llama-like D = 4096 / 8192 (fp16), a short row packed
    several to a program, and the streaming regime (fp32) for both norms; contiguous rows."""
    cases = [
        # (dtype, layer_norm, residual, bias, n_rows, d)
        ("fp16", False, False, False, 4096, 4096),
        ("fp16", False, True, False, 4096, 4096),
        ("fp16", False, True, False, 4096, 8192),
        ("fp16", True, True, True, 4096, 4096),
        ("fp16", True, False, True, 4096, 8192),
        ("fp16", False, False, False, 65536, 128),
        ("fp32", False, True, False, 4096, 8192),
        ("fp32", False, True, False, 64, 32768),
        ("fp32", True, True, True, 64, 32768),
    ]
    variants = []
    for dtype, layer_norm, residual, bias, n_rows, d in cases:
        config = choose_config(n_rows, d, arch)
        variants.append(
            Variant(
                KERNEL,
                signature(dtype),
                constants={
                    "LAYER_NORM": layer_norm,
                    "HAS_RESIDUAL": residual,
                    "HAS_BIAS": bias,
                    "BLOCK_D": config.block_d,
                    "ROWS": config.rows,
                    "ONE_BLOCK": config.one_block(d),
                },
                arch=arch,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                int_args={"n_rows": n_rows, "D": d, "stride_x": d, "stride_res": d},
            )
        )
    return variants


def signature(dtype: str, param_dtype: str | None = None) -> dict[str, str]:
    """Triton argument types of `norm_kernel` for activations of ``dtype``."""
    act, param = f"*{dtype}", f"*{param_dtype or dtype}"
    return {
        "x_ptr": act,
        "res_ptr": act,
        "w_ptr": param,
        "b_ptr": param,
        "out_ptr": act,
        "sum_ptr": act,
        "n_rows": "i32",
        "D": "i32",
        "stride_x": "i32",
        "stride_res": "i32",
        "eps": "fp32",
    }


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 1
