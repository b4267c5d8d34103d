"""Launch heuristics and cost of the dequant-matmul family (no Triton import here).

Regimes by M (rows of x), as the fastest low-bit kernels split them:

- ``gemv``   M <= 16: weight streaming dominates; split-K so that the N tiles times the K splits
  cover every SM a few times over. M <= 2 multiplies in registers (no tensor cores); M = 3..16
  takes one 16-row tensor-core tile, because a register tile for 4 or 8 rows must shrink its K
  depth until the packed weight no longer loads as 16-byte vectors (64-bit loads at M = 4, 32-bit
  at M = 8 in the sm_80/sm_90 builds), and the weight read is what a GEMV's time is.
- ``splitk`` 16 < M <= 128: tensor-core tiles; split K only while N tiles leave SMs idle.
- ``gemm``   M > 128: large tensor-core tiles, no split.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant
from kompakt.errors import CodegenError

# Streaming multiprocessors per arch's flagship part (A100: 108, H100 SXM: 132); datasheets.
SM_COUNT = {"sm_80": 108, "sm_90": 132}
# Programs per SM wanted in flight to hide DRAM latency in the weight-streaming regime; ~4 is where
# GEMV kernels usually saturate bandwidth (more only adds partial-sum traffic).
_WAVES = 4


@dataclass(frozen=True)
class Config:
    """Launch parameters of one dequant-matmul call."""

    regime: str  # "gemv", "splitk" or "gemm"
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # Split-K: the last split of each tile reduces (one launch), else a second reduce kernel.
    serial_reduce: bool = True

    @property
    def use_dot(self) -> bool:
        """Tensor cores (tl.dot) need every block dim >= 16."""
        return self.block_m >= 16


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _block_k(group_size: int, k: int, wanted: int) -> int:
    """The largest power-of-two BLOCK_K <= wanted that divides the group (one scale row a tile)."""
    if group_size >= k:  # per-channel: scales are applied after the K loop, any block works
        return wanted
    block = wanted
    while block > 16 and group_size % block:
        block //= 2
    if group_size % block:
        raise CodegenError(
            f"group size {group_size} is not a multiple of 16, which the Triton dequant-matmul "
            "kernels need (one scale row per K tile)"
        )
    return block


# Rows up to which the GEMV multiplies in registers rather than on a 16-row tensor-core tile.
_REGISTER_ROWS = 2


def gemv_tile(m: int, k: int, group_size: int, tensor_cores: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a GEMV (M <= 16) on tensor cores (16 rows, tl.dot) or
    with the [BLOCK_M, BLOCK_K, BLOCK_N] product in registers."""
    if tensor_cores:
        return 16, 128, _block_k(group_size, k, 64)
    block_m, block_n = _next_pow2(m), 64
    # 8192 fp32 products is 64 registers a thread at 4 warps (M = 1 at 64 x 128 builds with
    # 64-70); more rows take a shorter K tile instead of spilling.
    return block_m, block_n, _block_k(group_size, k, min(128, max(16, 8192 // (block_m * 64))))


def choose_config(
    m: int, n: int, k: int, group_size: int, bits: int = 4, arch: str = "sm_90"
) -> Config:
    """Picks regime and tiles for ``[m, k] @ [k, n]`` with ``bits``-bit weights."""
    if arch not in SM_COUNT:
        raise CodegenError(f"unknown arch '{arch}'; known: {', '.join(SM_COUNT)}")
    sms = SM_COUNT[arch]
    if m <= 16:
        block_m, block_n, block_k = gemv_tile(m, k, group_size, tensor_cores=m > _REGISTER_ROWS)
        regime, warps, stages = "gemv", 4, 3
    elif m <= 128:
        block_m, block_n = 32 if m <= 32 else 64, 128
        block_k = _block_k(group_size, k, 64)
        regime, warps, stages = "splitk", 4, 4
    else:
        # BLOCK_K 32 (163 registers on sm_80, 128 on sm_90, no spills; tests print them). 64
        # also builds spill-free once specialized like a launch (225 registers on sm_80, twice
        # the shared memory); which is faster is for a GPU to measure.
        block_m, block_n = 128, 128
        block_k = _block_k(group_size, k, 32)
        regime, warps, stages = "gemm", 8, 3
    tiles = -(-n // block_n) * -(-m // block_m)
    k_tiles = -(-k // block_k)
    split = 1
    if regime != "gemm":
        split = max(1, min(k_tiles, (_WAVES * sms) // max(tiles, 1), 16))
    return Config(regime, block_m, block_n, block_k, split, warps, stages)


def cost(m: int, n: int, k: int, group_size: int, bits: int = 4, act_bytes: int = 2):
    """(flops, bytes moved) of one call: packed weight, scales/zeros, x in, y out."""
    groups = -(-k // min(group_size, k))
    weight = k * n * bits // 8 + 2 * groups * n * act_bytes
    return 2 * m * n * k, weight + (m * k + m * n) * act_bytes


_KERNEL = "kompakt.codegen.dequant_matmul.kernel:dequant_matmul_kernel"


def _signature(dtype: str) -> dict[str, str]:
    ptr = f"*{dtype}"
    return {
        "x_ptr": ptr, "qw_ptr": "*i32", "scales_ptr": ptr, "zeros_ptr": ptr, "bias_ptr": ptr,
        "residual_ptr": ptr, "out_ptr": ptr, "partial_ptr": "*fp32",
        "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_rm": "i32",
        "stride_om": "i32", "counter_ptr": "*i32",
    }  # fmt: skip


def aot_variants(arch: str) -> list[Variant]:
    """Each regime (GEMV: M = 1 and 2 in registers, M = 8 and 16 on tensor cores) at
    K = N = 4096, group 128, fp16, 4-bit, with a residual epilogue, specialized as a launch with
    contiguous tensors would be."""
    variants = []
    for m in (1, 2, 8, 16, 64, 256):
        c = choose_config(m, 4096, 4096, 128, 4, arch)
        constants = dict(
            BITS=4, GROUP=128, PER_CHANNEL=False, HAS_BIAS=False, ACT=0, HAS_RESIDUAL=True,
            BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k,
            USE_DOT=c.use_dot, UPCAST=False, EVEN_K=True,
            SERIAL_REDUCE=c.split_k > 1 and c.serial_reduce, GLU=False,
        )  # fmt: skip
        # contiguous x, residual and y, as the launcher passes them
        ints = dict(M=m, N=4096, K=4096, stride_xm=4096, stride_rm=4096, stride_om=4096)
        for dtype in ("fp16", "bf16") if m == 16 else ("fp16",):  # bf16: most HF checkpoints
            variants.append(
                Variant(
                    _KERNEL, _signature(dtype), constants, arch, c.num_warps, c.num_stages,
                    int_args=ints,
                )
            )  # fmt: skip
    # Llama-7B's merged gate/up at decode: 2 x 11008 interleaved columns, SwiGLU in the epilogue
    c = choose_config(1, 22016, 4096, 128, 4, arch)
    glu = dict(
        BITS=4, GROUP=128, PER_CHANNEL=False, HAS_BIAS=False, ACT=2, HAS_RESIDUAL=False,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, SPLIT_K=c.split_k,
        USE_DOT=c.use_dot, UPCAST=False, EVEN_K=True, SERIAL_REDUCE=c.split_k > 1, GLU=True,
    )  # fmt: skip
    ints = dict(M=1, N=22016, K=4096, stride_xm=4096, stride_rm=0, stride_om=11008)
    variants.append(
        Variant(_KERNEL, _signature("fp16"), glu, arch, c.num_warps, c.num_stages, int_args=ints)
    )
    return variants
