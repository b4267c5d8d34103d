"""Launch configurations, the shape heuristic, AOT variants and the cost of the rotary kernel.

No triton import here: the backend and the cost model read this module on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant

KERNEL = "kompakt.codegen.rotary.kernel:rotary_kernel"

# Streaming multiprocessors: A100 108, H100/H200 SXM 132 (see norm/spec.py).
SMS = {"sm_80": 108, "sm_90": 132}

# Elements of x per program per head: 16 per thread at 4 warps, two 16-byte fp16 vectors in flight.
TILE_ELEMENTS = 2048

# Heads that share one load of the cos/sin tile. cos/sin are R values per token against 2 * D of
# x and out per head, so 8 heads bring their traffic under 1/16 of the total; more only costs
# parallelism.
MAX_HEADS = 8


@dataclass(frozen=True)
class Config:
    """How one rotary launch is tiled.

    Attributes:
        block_s: Sequence positions per program (a power of two).
        heads: Heads one program rotates in turn, reusing its cos/sin tile.
        num_warps: Warps per program.
        num_stages: Software-pipelining depth of the head loop.
    """

    block_s: int
    heads: int
    num_warps: int = 4
    num_stages: int = 2


def choose_config(
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    rotary_dim: int | None = None,
    arch: str = "sm_90",
) -> Config:
    """Tile ~2048 elements per head step; share cos/sin across heads while SMs stay busy.

    Prefill (long S): 16 positions x D = 128 per step, 8 heads per program. Decode (S = 1): one
    position per program and fewer heads each, so batch x heads still spreads over every SM.
    """
    rotary_dim = rotary_dim or head_dim
    # Padded features per position: both rotary halves, plus the pass-through block if any.
    width = 2 * _next_pow2(rotary_dim // 2)
    if rotary_dim < head_dim:
        width += _next_pow2(head_dim - rotary_dim)
    block_s = min(_next_pow2(seq), _prev_pow2(TILE_ELEMENTS // width))
    per_head = batch * -(-seq // block_s)  # programs when each program takes one head
    group = min(MAX_HEADS, _next_pow2(heads))
    while group > 1 and per_head * -(-heads // group) < 2 * SMS.get(arch, 132):
        group //= 2
    num_warps = min(8, _prev_pow2(block_s * width // 512))
    return Config(block_s=block_s, heads=group, num_warps=num_warps)


def cost(
    batch: int,
    heads: int,
    seq: int,
    head_dim: int,
    rotary_dim: int | None = None,
    *,
    cos_batch: int = 1,
    itemsize: int = 2,
) -> tuple[int, int]:
    """``(flops, bytes_moved)``: 3 flops per rotated element (2 multiplies, 1 add); x read and
    out written once, cos and sin read once per (batch row, position)."""
    rotary_dim = rotary_dim or head_dim
    flops = 3 * batch * heads * seq * rotary_dim
    moved = (
        2 * batch * heads * seq * head_dim * itemsize + 2 * cos_batch * seq * rotary_dim * itemsize
    )
    return flops, moved


def aot_variants(arch: str) -> list[Variant]:
    """Llama-like D = 128 (prefill and decode, fp16; prefill fp32) and partial rotary: NeoX-style
    D = 128 with R = 32, and Phi-2's D = 80 with R = 32 (neither a power of two)."""
    cases = [
        # (dtype, batch, heads, seq, head_dim, rotary_dim)
        ("fp16", 1, 32, 4096, 128, 128),
        ("fp16", 64, 32, 1, 128, 128),
        ("fp32", 1, 32, 4096, 128, 128),
        ("fp16", 1, 32, 2048, 128, 32),
        ("fp16", 1, 32, 2048, 80, 32),
    ]
    variants = []
    for dtype, batch, heads, seq, head_dim, rotary_dim in cases:
        config = choose_config(batch, heads, seq, head_dim, rotary_dim, arch)
        variants.append(
            Variant(
                KERNEL,
                signature(dtype),
                constants={**constants(config, head_dim, rotary_dim), **_PLAIN},
                arch=arch,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
                int_args=_launch_ints(config, batch, seq, head_dim, rotary_dim, (heads, 0), heads),
            )
        )
    # q and k of a Llama-3-8B-like decode step (32 + 8 heads) in one launch, both read in place
    # from the merged q/k/v projection (32 + 8 + 8 heads a row)
    config = choose_config(1, 40, 1, 128, 128, arch)
    pair = {**constants(config, 128, 128), **_PLAIN, "PAIR": True}
    ints = _launch_ints(config, 1, 1, 128, 128, (32, 8), 48)
    variants.append(
        Variant(
            KERNEL, signature("fp16"), pair, arch, config.num_warps, config.num_stages, True, ints
        )
    )
    # ... with k and v appended to 4096-slot static caches (what a fused decode step runs)
    append = {**pair, "APPEND": True, "BLOCK_D": 128}
    cache = {"stride_o2b": 8 * 4096 * 128, "stride_o2h": 4096 * 128, "stride_o2n": 128}
    vout = {"stride_vob": 8 * 4096 * 128, "stride_voh": 4096 * 128, "stride_von": 128}
    v = {"stride_vb": 48 * 128, "stride_vh": 128, "stride_vs": 48 * 128}  # from the q/k/v row
    ints = {**ints, "N": 4096, **cache, **vout, **v, "GROUPS2": -(-8 // config.heads)}
    variants.append(
        Variant(
            KERNEL, signature("fp16"), append, arch, config.num_warps, config.num_stages, True,
            ints,
        )
    )  # fmt: skip
    return variants


_PLAIN = {"PAIR": False, "APPEND": False, "BLOCK_D": 16}


def _launch_ints(
    config: Config,
    batch: int,
    seq: int,
    head_dim: int,
    rotary_dim: int,
    heads: tuple[int, int],
    row_heads: int,
) -> dict[str, int]:
    """Integer arguments of a launch on x (and x2) viewed [B, H, S, D] from a projection output
    [B, S, row_heads * D], with one cos/sin table [1, S, R] shared by the batch."""
    row = row_heads * head_dim
    strides = {"b": seq * row, "h": head_dim, "s": row}
    return {
        "H": heads[0], "S": seq, "D": head_dim, "HALF": rotary_dim // 2,
        "S_BLOCKS": -(-seq // config.block_s), "GROUPS": -(-heads[0] // config.heads),
        "stride_cb": 0, "stride_cs": rotary_dim, "stride_sb": 0, "stride_ss": rotary_dim,
        "H2": heads[1],
        **{f"stride_x{d}": v for d, v in strides.items()},
        **{f"stride_x2{d}": v for d, v in strides.items()},
        # no append: the launcher leaves these at their defaults
        **dict.fromkeys(["N", "stride_o2b", "stride_o2h", "stride_o2n", "GROUPS2"], 0),
        **{f"stride_v{o}{d}": 0 for o in ("", "o") for d in ("b", "h", "sn"[o == "o"])},
    }  # fmt: skip


def constants(config: Config, head_dim: int, rotary_dim: int) -> dict[str, int | bool]:
    """The ``tl.constexpr`` arguments of `rotary_kernel` for a config and head shape."""
    return {
        "BLOCK_S": config.block_s,
        "BLOCK_HALF": _next_pow2(rotary_dim // 2),
        "BLOCK_PASS": _next_pow2(max(1, head_dim - rotary_dim)),
        "HEADS": config.heads,
        "HAS_PASS": rotary_dim < head_dim,
    }  # PAIR is given per launch (aot_variants: both)


def signature(dtype: str, table_dtype: str | None = None) -> dict[str, str]:
    """Triton argument types of `rotary_kernel` for x (and x2) of ``dtype``."""
    act, table = f"*{dtype}", f"*{table_dtype or dtype}"
    ints = (
        "H S D HALF S_BLOCKS stride_xb stride_xh stride_xs stride_cb stride_cs stride_sb stride_ss"
    )
    second = "H2 stride_x2b stride_x2h stride_x2s GROUPS"
    append = "N stride_o2b stride_o2h stride_o2n"
    copy = "stride_vb stride_vh stride_vs stride_vob stride_voh stride_von GROUPS2"
    return {
        "x_ptr": act,
        "cos_ptr": table,
        "sin_ptr": table,
        "out_ptr": act,
        **dict.fromkeys(ints.split(), "i32"),
        "x2_ptr": act,
        "out2_ptr": act,
        **dict.fromkeys(second.split(), "i32"),
        "pos_ptr": "*i64",
        **dict.fromkeys(append.split(), "i32"),
        "v_ptr": act,
        "vout_ptr": act,
        **dict.fromkeys(copy.split(), "i32"),
    }


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 1
