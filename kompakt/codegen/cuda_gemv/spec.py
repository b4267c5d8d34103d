"""Launch configuration, shape heuristic and cost of the CUDA C W4A16 GEMV.

Everything in a `Config` is baked into the generated CUDA source as a compile-time constant (the
accumulator arrays are sized by it and the inner loops unrolled over it), so one config is one
compiled kernel. No torch or triton import here: the cost model reads this module anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.errors import CodegenError

ARCHS = ("sm_80", "sm_90")

# Streaming multiprocessors and HBM bandwidth (public datasheets): A100-80GB has 108 SMs and
# ~2.0 TB/s; sm_90 is taken as the H200 (132 SMs, 4.8 TB/s), the fastest memory of the family, so
# an H100 (3.35 TB/s) gets a little more parallelism than it needs rather than too little.
SMS = {"sm_80": 108, "sm_90": 132}
BANDWIDTH = {"sm_80": 2.0e12, "sm_90": 4.8e12}

# Loaded DRAM latency is ~600 ns on both; Little's law: bytes in flight = bandwidth x latency.
LATENCY_S = 600e-9

# The largest shared-memory tile we allow: the 48 KiB a kernel may declare statically.
MAX_STATIC_SHARED = 48 * 1024

THREADS = 128  # 4 warps: small blocks let many co-reside on an SM, and the last wave is short


@dataclass(frozen=True)
class Config:
    """One compiled variant of the GEMV kernel (all fields become constants in the source).

    Attributes:
        threads: Threads per block (a multiple of the 32-thread warp).
        cols: Output columns per thread; thread t of a block owns columns
            ``block_col0 + t + j * threads`` for j < cols, so every load is warp-coalesced.
        split_k: Blocks along K per column slice. Their fp32 partials go to a [split_k, M, N]
            workspace that a second kernel sums in split order (deterministic; see README.md).
        m_tile: Rows of x per block (the accumulators are [m_tile][cols] registers).
        k_tile: K values of x staged in shared memory at a time (a multiple of 8 * unroll).
        unroll: Packed qweight rows (8 K values each) one thread loads before using any of them.
        group_size: Rows of K per scale/zero row (a multiple of 8 * unroll, so that the words of
            one unrolled step share one scale and zero).
    """

    threads: int = THREADS
    cols: int = 2
    split_k: int = 1
    m_tile: int = 1
    k_tile: int = 256
    unroll: int = 4
    group_size: int = 128

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> CodegenError:
            value = getattr(self, field)
            return CodegenError(f"cuda_gemv Config.{field}={value}: {why}")

        if self.threads % 32 or not 32 <= self.threads <= 1024:
            raise bad("threads", "must be a multiple of 32 in [32, 1024]")
        if not 1 <= self.cols <= 8:
            raise bad("cols", "must be in [1, 8] (registers)")
        if not 1 <= self.split_k <= 65535:
            raise bad("split_k", "must be in [1, 65535] (gridDim.y)")
        if not 1 <= self.m_tile <= 16:
            raise bad("m_tile", "must be in [1, 16] (registers)")
        if self.m_tile * self.cols > 32:
            # 2 * m_tile * cols fp32 accumulators; m_tile 16 x cols 8 spills 1.5 KB at 255 regs
            raise bad("cols", f"x m_tile = {self.m_tile * self.cols} accumulators, max 32")
        if self.unroll not in (1, 2, 4, 8):
            raise bad("unroll", "must be 1, 2, 4 or 8")
        if self.k_tile <= 0 or self.k_tile % (8 * self.unroll):
            raise bad("k_tile", f"must be a positive multiple of 8 * unroll = {8 * self.unroll}")
        if self.group_size <= 0 or self.group_size % (8 * self.unroll):
            raise bad(
                "group_size", f"must be a positive multiple of 8 * unroll = {8 * self.unroll}"
            )
        if self.shared_bytes > MAX_STATIC_SHARED:
            raise bad("k_tile", f"needs {self.shared_bytes} B of shared memory (max 48 KiB)")

    @property
    def name(self) -> str:
        """Suffix of the kernel symbols; distinct configs never share a symbol."""
        return (
            f"t{self.threads}_c{self.cols}_s{self.split_k}_m{self.m_tile}"
            f"_k{self.k_tile}_u{self.unroll}_g{self.group_size}"
        )

    @property
    def shared_bytes(self) -> int:
        """Staged x (fp32) plus one fp32 sum of x per packed row."""
        return 4 * self.m_tile * self.k_tile + 4 * self.m_tile * (self.k_tile // 8)

    def grid(self, m: int, n: int) -> tuple[int, int, int]:
        """(column slices, K splits, M tiles): the main kernel's gridDim."""
        per_block = self.threads * self.cols
        return (_cdiv(n, per_block), self.split_k, _cdiv(m, self.m_tile))

    def chunk_rows(self, k: int) -> int:
        """Packed rows per K split: an even share of ceil(K/8), rounded up to whole steps."""
        share = _cdiv(_cdiv(k, 8), self.split_k)
        return _cdiv(share, self.unroll) * self.unroll


def choose_config(m: int, n: int, k: int, arch: str = "sm_90", group_size: int = 128) -> Config:
    """The launch heuristic for ``y[m, n] = x[m, k] @ W`` with ``group_size`` rows per scale."""
    if arch not in ARCHS:
        raise CodegenError(f"cuda_gemv: arch '{arch}' is not one of {', '.join(ARCHS)}")
    if min(m, n, k) < 1:
        raise CodegenError(f"cuda_gemv: shape m={m}, n={n}, k={k} must be positive")
    if group_size % 8:
        raise CodegenError(
            f"cuda_gemv: group_size {group_size} is not a multiple of 8 (a packed word would "
            "straddle two scale groups); use the Triton dequant_matmul family for it"
        )
    # All of M (<= 16) in one block, so each weight byte is read from DRAM once.
    m_tile = min(16, _next_pow2(m))
    # Accumulators are 2 * m_tile * cols fp32 registers (running sum + one step's dot); keeping
    # that <= 32 leaves room for unroll * cols words in flight well under 128 registers/thread.
    cols = max(1, min(4, 16 // m_tile))
    # The largest unroll whose step (8 * unroll rows of K) stays inside one scale group.
    unroll = next(u for u in (8, 4, 2, 1) if (group_size // 8) % u == 0)
    rows = _cdiv(k, 8)
    col_blocks = _cdiv(n, THREADS * cols)
    sms = SMS[arch]
    # Little's law: each split keeps n * unroll * 4 bytes of qweight in flight across all
    # threads (independent of cols), so enough splits cover bandwidth x latency.
    in_flight = BANDWIDTH[arch] * LATENCY_S
    split = _cdiv(int(in_flight), n * unroll * 4)
    # ...but the [split, m, n] fp32 workspace (written then read: 8 bytes per entry) should stay
    # under 1/8 of the weight's k * n / 2 bytes: split <= k / (128 * m).
    split = min(split, max(1, k // (128 * m)))
    # Every SM gets a block; at m_tile >= 8 the kernel is ALU-bound (m FMAs per weight nibble),
    # so aim for 4 blocks (16 warps) per SM to hide FMA and shared-load latency instead.
    per_sm = 4 if m_tile >= 8 else 1
    split = max(split, _cdiv(per_sm * sms, col_blocks))
    split = max(1, min(split, rows // unroll))  # every split has at least one whole step
    # Re-derive the count from the rounded chunk so that no split is left empty.
    chunk = _cdiv(_cdiv(rows, split), unroll) * unroll
    split = _cdiv(rows, chunk)
    # Stage x 256 K values at a time (16 KiB fp32 at m_tile 16), or the whole chunk if shorter
    # (both are multiples of 8 * unroll, as Config requires).
    k_tile = min(256, chunk * 8)
    return Config(THREADS, cols, split, m_tile, k_tile, unroll, group_size)


def cost(m: int, n: int, k: int, group_size: int, split_k: int = 1) -> tuple[int, int]:
    """``(flops, bytes_moved)`` of one launch, for the cost model.

    Flops: a multiply-add per (m, n, k) (the dequantization is per weight, not per flop). Bytes:
    the packed weight (int32 per 8 rows), fp16 scales and zeros per group, x and y in fp16, and
    with split_k > 1 the fp32 workspace written once and read once.
    """
    rows = _cdiv(k, 8)
    groups = _cdiv(k, group_size)
    weight = 4 * rows * n + 2 * 2 * groups * n
    activations = 2 * m * k + 2 * m * n
    workspace = 8 * split_k * m * n if split_k > 1 else 0
    return 2 * m * n * k, weight + activations + workspace


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()
