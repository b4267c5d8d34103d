"""Launch configurations, the shape heuristic, AOT variants and the cost model of attention.

No triton import here: the runtime and cost model read this module on machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from kompakt.codegen.aot import Variant

HEAD_DIMS = (16, 32, 64, 128)
_SMS = {"sm_80": 108, "sm_90": 132}  # A100 and H100/H200 (SXM) streaming multiprocessors
_MODULE = "kompakt.codegen.attention.kernel"

# Decode: a split must read enough keys that its partials (max, sum, acc: (D + 2) fp32 values per
# query head, written once and read once by the combine) are small next to the K/V it streams
# (chunk * D * 2 tensors * 2 bytes): about 2 * group / chunk of it, at 256 keys under 1% for
# multi-head attention and 6% for a GQA group of 8.
MIN_KEYS_PER_SPLIT = 256
# The combine loads every split's [D] accumulator at once; 64 splits x D=128 fp32 is 32 KiB per
# program, still in registers for 4 warps, and 64 splits already fill an H100 from one sequence.
MAX_SPLITS = 64


@dataclass(frozen=True)
class Config:
    """One launch configuration.

    Attributes:
        block_m: Prefill query rows per program (a power of two >= 16; tl.dot needs 16).
            Decode ignores it: its rows are the GQA group's query heads.
        block_n: Keys per inner-loop step (a power of two >= 16).
        num_warps: Warps per program.
        num_stages: Software-pipelining depth of the K/V loads.
        num_splits: Decode only: key chunks per sequence, each its own program (flash-decoding).
        one_launch: Decode only: the chunk that finishes last combines the chunks' partials
            (one launch); off, a second kernel combines them.
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int = 1
    one_launch: bool = True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_config(
    batch: int,
    heads_q: int,
    heads_kv: int,
    seq_q: int,
    seq_kv: int,
    head_dim: int,
    dtype_bytes: int = 2,
    arch: str = "sm_90",
) -> Config:
    """The launch heuristic: seq_q == 1 is decode, anything longer is prefill."""
    if seq_q == 1:
        return _decode_config(batch, heads_kv, seq_kv, head_dim, dtype_bytes, arch)
    return _prefill_config(batch, heads_q, seq_q, head_dim, dtype_bytes, arch)


def _prefill_config(
    batch: int, heads_q: int, seq_q: int, head_dim: int, dtype_bytes: int, arch: str
) -> Config:
    if dtype_bytes == 4:
        # fp32 runs 3xTF32 dots (three tensor-core passes): fp32 operands take twice the
        # registers of fp16 ones, so tiles are small. ptxas, builds specialized like a launch:
        # D <= 64 builds without spills on both archs; at D=128 this tile takes 254 registers
        # and spills nothing, 64 x 16 and 32 x 32 spill (sm_80: 1.5 KB and 4 B).
        if head_dim == 128:
            return Config(block_m=32, block_n=16, num_warps=4, num_stages=2)
        return Config(block_m=64, block_n=16, num_warps=8, num_stages=2)
    # 128 query rows per program halve how often each K/V tile is re-read (compute-bound regime).
    block_m = 128
    if seq_q <= 64 or batch * heads_q * _cdiv(seq_q, 128) < _SMS.get(arch, 108):
        # Short prompts or few heads: 128-row tiles would compute padding or leave SMs idle;
        # 64 is still one full Hopper warp group (wgmma's M) and four Ampere m16 tiles.
        block_m = 64
    return prefill_tile(block_m, head_dim, arch)


def prefill_tile(block_m: int, head_dim: int, arch: str) -> Config:
    """The fp16 prefill tile for a given number of query rows (also what AOT builds)."""
    if block_m >= 128:
        # At D=128 the [128, 128] fp32 accumulator is 128 registers a thread with 4 warps; 8
        # warps halve it (ptxas: 217 registers on sm_80, 180 on sm_90, no spills). At D=64, 4
        # warps spill on sm_80 and 8 build with 155; D <= 32 fits 4 warps (under 200).
        return Config(block_m, 64, num_warps=8 if head_dim >= 64 else 4, num_stages=3)
    # Ampere keeps q's mma fragments in registers: at D=128 with 64-key score tiles a 4-warp
    # program hits the 255-register ceiling, 32-key tiles build with 172. Hopper's wgmma reads q
    # from shared memory and fits 64 keys (176 registers).
    block_n = 32 if arch == "sm_80" and head_dim == 128 else 64
    # Three K/V stages: 16 KiB of q plus 3 x 32 KiB of K and V = 112 KiB of shared memory at
    # D=128 (128 KiB with 128 rows), under Ampere's 163 KiB and Hopper's 227 KiB per block.
    return Config(block_m, block_n, num_warps=4, num_stages=3)


def _decode_config(
    batch: int, heads_kv: int, seq_kv: int, head_dim: int, dtype_bytes: int, arch: str
) -> Config:
    # One program serves a whole GQA group (all query heads of one kv head, so K/V are read once),
    # hence the grid before splitting is batch * heads_kv. Decode is bound by reading the cache:
    # aim for two programs per SM so one's loads overlap the other's math.
    target = 2 * _SMS.get(arch, 108)
    splits = _cdiv(target, max(1, batch * heads_kv))
    # Split by the cache's capacity (seq_kv), not the live lengths: those sit on the device, and a
    # host-side shape-only choice keeps the launch free of syncs (and CUDA-graph friendly).
    splits = max(1, min(splits, seq_kv // MIN_KEYS_PER_SPLIT, MAX_SPLITS))
    # fp32 K/V tiles are twice the bytes and the 3xTF32 dot holds more: at D=128, 32 keys per
    # step spill on sm_90 and 16 do not (195 registers); fp16 takes 64 in 128 registers.
    block_n = 16 if dtype_bytes == 4 else 64
    return Config(block_m=16, block_n=block_n, num_warps=4, num_stages=2, num_splits=splits)


def causal_pairs(seq_q: int, seq_kv: int) -> int:
    """(query, key) pairs the bottom-right causal mask keeps: query i sees i + Skv - Sq + 1 keys."""
    diag = seq_kv - seq_q
    return seq_q * diag + seq_q * (seq_q + 1) // 2


def cost(
    batch: int,
    heads_q: int,
    heads_kv: int,
    seq_q: int,
    seq_kv: int,
    head_dim: int,
    causal: bool = False,
    dtype_bytes: int = 2,
    num_splits: int = 1,
) -> tuple[int, int]:
    """(flops, bytes moved) of one attention call.

    Flops count the two matmuls (2 * D each per visible pair); the softmax is lower order. Bytes
    assume each kv head's K/V come from DRAM once (L2 serves the query blocks and GQA heads that
    share them), q read once, out written once, plus decode's fp32 partials written and re-read.
    """
    pairs = causal_pairs(seq_q, seq_kv) if causal else seq_q * seq_kv
    flops = 4 * batch * heads_q * head_dim * pairs
    moved = dtype_bytes * (
        2 * batch * heads_q * seq_q * head_dim + 2 * batch * heads_kv * seq_kv * head_dim
    )
    if seq_q == 1 and num_splits > 1:
        moved += 2 * 4 * batch * heads_q * num_splits * (head_dim + 2)
    return flops, moved


def _strides(prefix: str, dims: str) -> dict[str, str]:
    return {f"stride_{prefix}{d}": "i32" for d in dims}


def prefill_signature(dtype: str, mask: str | None = None) -> dict[str, str]:
    """Argument types of `flash_prefill_kernel` (dtype: "fp16" or "fp32"; mask: the mask's
    element type, e.g. "fp16" or "i1", or None when there is none and q stands in for it)."""
    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Mask": f"*{mask or dtype}"}
    sig.update({"Out": f"*{dtype}", "qk_scale": "fp32"})
    for t in "qkvmo":
        sig.update(_strides(t, "bhnd" if t in "kv" else "bhmn" if t == "m" else "bhmd"))
    sig.update({"heads_q": "i32", "group": "i32", "seq_q": "i32", "seq_kv": "i32"})
    return sig


def decode_split_signature(dtype: str, mask: str | None = None) -> dict[str, str]:
    """Argument types of `flash_decode_split_kernel` (mask: as in prefill_signature)."""
    sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Lengths": "*i32"}
    sig.update({"Mask": f"*{mask or dtype}", "Mpart": "*fp32", "Lpart": "*fp32"})
    sig.update({"AccPart": "*fp32", "qk_scale": "fp32"})
    sig.update(_strides("q", "bhd"))
    sig.update(_strides("k", "bhnd"))
    sig.update(_strides("v", "bhnd"))
    sig.update(_strides("m", "bhn"))
    sig.update({"heads_kv": "i32", "group": "i32", "seq_kv": "i32", "chunk": "i32"})
    sig["num_splits"] = "i32"
    # the in-kernel combine (Config.one_launch): where it writes, and the arrival counters
    sig.update({"Out": f"*{dtype}", **_strides("o", "bhd"), "Counters": "*i32"})
    return sig


def decode_combine_signature(dtype: str) -> dict[str, str]:
    """Argument types of `flash_decode_combine_kernel`."""
    sig = {"Mpart": "*fp32", "Lpart": "*fp32", "AccPart": "*fp32", "Out": f"*{dtype}"}
    sig.update(_strides("o", "bhd"))
    sig.update({"heads_q": "i32", "num_splits": "i32"})
    return sig


def _unit_inner_strides(sig: dict[str, str]) -> dict[str, int]:
    # Contiguous head dims, as at run time, where Triton specializes stride == 1 itself; without
    # it the AOT build could not vectorize the loads along D.
    return {name: 1 for name in sig if name.startswith("stride_") and name.endswith("d")}


def _prefill_variant(
    dtype: str,
    head_dim: int,
    tile: Config,
    arch: str,
    mask: str | None = None,
    heads: tuple[int, int] = (32, 8),
    seq: int = 4096,
) -> Variant:
    sig = prefill_signature(dtype, mask)
    consts: dict = {"HEAD_D": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n}
    # fp32 runs 3xTF32 (see kernel._dot_precision); fp16 ignores the setting.
    consts.update(CAUSAL=mask is None, DOT_PRECISION="tf32x3" if dtype == "fp32" else "tf32")
    consts["MASK"] = "none" if mask is None else "bool" if mask == "i1" else "add"
    consts["EMPTY_NAN"] = mask is not None  # what fuse-attention binds for an unguarded softmax
    consts.update(_unit_inner_strides(sig))
    if mask is not None:
        consts["stride_mn"] = 1  # a contiguous key axis, as masks are laid out
    kernel = f"{_MODULE}:flash_prefill_kernel"
    ints = _prefill_ints(heads, seq, head_dim, masked=mask is not None)
    return Variant(kernel, sig, consts, arch, tile.num_warps, tile.num_stages, True, ints)


def _prefill_ints(heads: tuple[int, int], seq: int, head_dim: int, masked: bool) -> dict[str, int]:
    """Integer arguments of a batch-1 prefill launch as fuse-attention binds it: q and out are
    head views [B, H, S, D] of [B, S, H, D] projections, k and v static caches [B, Hkv, S, D],
    the mask [B, 1, S, S] (zeros when there is none)."""
    heads_q, heads_kv = heads
    rows = {"b": seq * heads_q * head_dim, "h": head_dim, "m": heads_q * head_dim}
    cache = {"b": heads_kv * seq * head_dim, "h": seq * head_dim, "n": head_dim}
    mask = {"b": seq * seq, "h": 0, "m": seq} if masked else dict.fromkeys("bhm", 0)
    ints = {f"stride_q{d}": v for d, v in rows.items()} | {
        f"stride_o{d}": v for d, v in rows.items()
    }
    ints |= {f"stride_{t}{d}": v for t in "kv" for d, v in cache.items()}
    ints |= {f"stride_m{d}": v for d, v in mask.items()}
    if not masked:
        ints["stride_mn"] = 0
    return ints | {"heads_q": heads_q, "group": heads_q // heads_kv, "seq_q": seq, "seq_kv": seq}


def _decode_ints(
    config: Config, heads: tuple[int, int], seq_kv: int, head_dim: int, masked: bool
) -> tuple[dict[str, int], dict[str, int]]:
    """Integer arguments of a batch-1 decode launch (split kernel, combine kernel): q and out
    contiguous [B, H, 1, D], static caches [B, Hkv, seq_kv, D], the mask [B, 1, 1, seq_kv]."""
    heads_q, heads_kv = heads
    chunk = _cdiv(_cdiv(seq_kv, config.num_splits), config.block_n) * config.block_n
    splits = _cdiv(seq_kv, chunk)
    cache = {"b": heads_kv * seq_kv * head_dim, "h": seq_kv * head_dim, "n": head_dim}
    split = {"stride_qb": heads_q * head_dim, "stride_qh": head_dim}
    split |= {f"stride_{t}{d}": v for t in "kv" for d, v in cache.items()}
    split |= {"stride_mb": seq_kv if masked else 0, "stride_mh": 0}
    if not masked:
        split["stride_mn"] = 0
    split |= {"heads_kv": heads_kv, "group": heads_q // heads_kv, "seq_kv": seq_kv}
    split |= {"chunk": chunk, "num_splits": splits}
    combine = {"stride_ob": heads_q * head_dim, "stride_oh": head_dim}
    return split | combine, combine | {"heads_q": heads_q, "num_splits": splits}


def aot_variants(arch: str) -> list[Variant]:
    """What the tests compile: the fp16 D=128 prefill tiles (64 and 128 rows), the fp32 D=64
    prefill tile, the 64-row fp16 tile with an fp16 additive mask (what fuse-attention binds),
    and the fp16 D=128 decode pairs (by lengths; by an fp16 mask), all as the heuristic
    configures them."""
    out = [_prefill_variant("fp16", 128, prefill_tile(m, 128, arch), arch) for m in (64, 128)]
    fp32_tile = _prefill_config(1, 1, 4096, 64, 4, arch)
    out.append(_prefill_variant("fp32", 64, fp32_tile, arch, heads=(1, 1)))
    out.append(_prefill_variant("fp16", 128, prefill_tile(64, 128, arch), arch, mask="fp16"))
    decode = _decode_config(1, 8, 32768, 128, 2, arch)
    # Decode by lengths (the launcher's own use), and by an fp16 additive mask over every cache
    # slot (what bind runs for a decode step of a captured static-cache model).
    for mask in (None, "fp16"):
        sig = decode_split_signature("fp16", mask)
        consts = {"HEAD_D": 128, "BLOCK_H": 16, "BLOCK_N": decode.block_n}
        consts.update(HAS_LENGTHS=mask is None, DOT_PRECISION="tf32", COMBINE=decode.one_launch)
        consts["EMPTY_NAN"] = mask is not None
        consts["MASK"] = "none" if mask is None else "add"
        consts.update(_unit_inner_strides(sig))
        if mask is not None:
            consts["stride_mn"] = 1
        kernel = f"{_MODULE}:flash_decode_split_kernel"
        split, combine = _decode_ints(decode, (32, 8), 32768, 128, masked=mask is not None)
        warps, stages = decode.num_warps, decode.num_stages
        out.append(Variant(kernel, sig, consts, arch, warps, stages, True, split))
        sig = decode_combine_signature("fp16")
        consts = {"HEAD_D": 128, "BLOCK_S": 64, **_unit_inner_strides(sig)}  # up to MAX_SPLITS
        consts["BASE2"] = mask is None  # a masked split's maxima are in natural units
        consts["EMPTY_NAN"] = mask is not None
        kernel = f"{_MODULE}:flash_decode_combine_kernel"
        out.append(Variant(kernel, sig, consts, arch, 4, 1, True, combine))
    return out
