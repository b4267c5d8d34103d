"""The rotary family: the rotary-embedding kernel against the torch reference (Triton's
interpreter on CPU) and Hugging Face's own function, layouts, bad inputs, the launch heuristic,
and ahead-of-time builds for sm_80 and sm_90."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.codegen.rotary import Config, aot_variants, choose_config, cost
from kompakt.codegen.rotary.reference import rotary_reference
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.rotary.kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# 2 positions x 2 heads per program: heads = 3 or 5 leave a short last head group, S = 5 or 7 a
# masked position row.
SMALL = Config(block_s=2, heads=2, num_warps=1)

# (batch, heads, seq, head_dim, rotary_dim, cos batch)
SHAPES = [
    (2, 3, 5, 16, 16, 2),  # per-batch positions
    (1, 1, 1, 8, 8, 1),  # decode: one token, one head
    (2, 5, 7, 20, 12, 1),  # partial rotary, half = 6 (not a power of two)
    (1, 3, 9, 80, 32, 1),  # Phi-2's head: D = 80, R = 32
]


def _tables(batch, seq, rotary_dim, dtype, offset=3):
    """Hugging Face-style cos/sin [batch, S, R] (equal halves), positions offset per batch row."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    positions = torch.arange(seq).float()[None, :] + offset * torch.arange(batch).float()[:, None]
    freqs = positions[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_reference_matches_hugging_face(rotary_dim):
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    x = _x((2, 3, 5, 16), torch.float32).cpu()
    cos, sin = (t.cpu() for t in _tables(2, 5, rotary_dim, torch.float32))
    want, _ = neox.apply_rotary_pos_emb(x, x, cos, sin)  # rotates the first cos.shape[-1] features
    torch.testing.assert_close(rotary_reference(x, cos, sin), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_rotary_matches_reference(dtype, shape, config):
    batch, heads, seq, head_dim, rotary_dim, cos_batch = shape
    x = _x((batch, heads, seq, head_dim), dtype)
    cos, sin = _tables(cos_batch, seq, rotary_dim, dtype)
    got = kernel.launch_rotary(x, cos, sin, config=config)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    torch.testing.assert_close(got, rotary_reference(x, cos, sin), **TOLERANCE[dtype])
    if rotary_dim < head_dim:  # the pass-through features are copied bit for bit
        assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_pair_rotates_q_and_k_in_one_launch(dtype, shape, config):
    """q and k (k with fewer heads, as grouped-query attention has them) in one launch: each
    equals its own launch_rotary, whichever tensor a program's head group belongs to."""
    batch, heads, seq, head_dim, rotary_dim, cos_batch = shape
    q = _x((batch, heads, seq, head_dim), dtype, seed=1)
    k = _x((batch, max(1, heads // 2), seq, head_dim), dtype, seed=2).transpose(1, 2)
    k = k.contiguous().transpose(1, 2)  # stored [B, S, H, D], as a projection leaves it
    cos, sin = _tables(cos_batch, seq, rotary_dim, dtype)
    got_q, got_k = kernel.launch_rotary_pair(q, k, cos, sin, config=config)
    torch.testing.assert_close(got_q, rotary_reference(q, cos, sin), **TOLERANCE[dtype])
    torch.testing.assert_close(got_k, rotary_reference(k, cos, sin), **TOLERANCE[dtype])
    assert got_k.shape == k.shape and got_k.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_append_writes_k_and_v_into_the_caches_at_their_positions(dtype, shape, config):
    """launch_rotary_append: q rotated as launch_rotary does; rotated k and plain v land in the
    caches at the positions' rows (a negative one counted from the end, an out-of-range one not
    written) and nowhere else; k and v are read in place from a [B, S, H, D] projection."""
    batch, heads, seq, head_dim, rotary_dim, cos_batch = shape
    heads2, slots = max(1, heads // 2), seq + 4
    q = _x((batch, heads, seq, head_dim), dtype, seed=1)
    projected = _x((batch, seq, 2 * heads2, head_dim), dtype, seed=2)  # k and v heads, one row
    k, v = projected.transpose(1, 2).split(heads2, dim=1)
    if config is SMALL:  # k with every other feature: copied to unit stride first, as a pair's
        k = _x((batch, heads2, seq, 2 * head_dim), dtype, seed=5)[..., ::2]
    cos, sin = _tables(cos_batch, seq, rotary_dim, dtype)
    positions = torch.arange(seq, device=DEVICE) + 2
    positions[0] = -1  # the last slot
    if seq > 2:
        positions[-1] = slots + 5  # out of range: skipped
    k_cache = _x((batch, heads2, slots, head_dim), dtype, seed=3)
    v_cache = _x((batch, heads2, slots, head_dim), dtype, seed=4)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    rotated = rotary_reference(k, cos, sin)
    for i, p in enumerate(positions.tolist()):
        if -slots <= p < slots:
            want_k[:, :, p], want_v[:, :, p] = rotated[:, :, i], v[:, :, i]
    got_q = kernel.launch_rotary_append(q, k, v, cos, sin, positions, k_cache, v_cache, config)
    torch.testing.assert_close(got_q, rotary_reference(q, cos, sin), **TOLERANCE[dtype])
    torch.testing.assert_close(k_cache, want_k, **TOLERANCE[dtype])
    assert torch.equal(v_cache, want_v)


def test_append_rejects_caches_and_positions_that_do_not_fit():
    q, k = _x((1, 4, 3, 16), torch.float32), _x((1, 2, 3, 16), torch.float32)
    cos, sin = _tables(1, 3, 16, torch.float32)
    cache = _x((1, 2, 8, 16), torch.float32)
    positions = torch.arange(3, device=DEVICE)
    with pytest.raises(CodegenError, match=r"k_cache \[1, 2, 8, 16\] and v_cache \[1, 3, 8, 16\]"):
        kernel.launch_rotary_append(
            q, k, k, cos, sin, positions, cache, _x((1, 3, 8, 16), torch.float32)
        )
    with pytest.raises(CodegenError, match=r"positions must be \[3\] integers"):
        kernel.launch_rotary_append(q, k, k, cos, sin, positions[:2], cache, cache.clone())
    with pytest.raises(CodegenError, match="positions must be int32/int64"):
        kernel.launch_rotary_append(q, k, k, cos, sin, positions.float(), cache, cache.clone())
    with pytest.raises(CodegenError, match="v must be a 4-D torch.float32"):
        kernel.launch_rotary_append(q, k, k.half(), cos, sin, positions, cache, cache.clone())


def test_pair_rejects_a_second_tensor_of_another_shape_or_dtype():
    q = _x((1, 4, 5, 16), torch.float32)
    cos, sin = _tables(1, 5, 16, torch.float32)
    with pytest.raises(CodegenError, match=r"x2 must be \[1, H2, 5, 16\]"):
        kernel.launch_rotary_pair(q, _x((1, 4, 6, 16), torch.float32), cos, sin)
    with pytest.raises(CodegenError, match="x2 has dtype torch.float16"):
        kernel.launch_rotary_pair(q, q.half(), cos, sin)


def test_layouts():
    cos, sin = _tables(1, 6, 16, torch.float16)
    projected = _x((2, 6, 3, 16), torch.float16)  # [B, S, H, D] as a projection writes it
    x = projected.transpose(1, 2)  # [B, H, S, D] view: strided, used in place
    torch.testing.assert_close(
        kernel.launch_rotary(x, cos, sin), rotary_reference(x, cos, sin), atol=2e-3, rtol=2e-3
    )
    # The same tables as [S, R] and as [B, 1, S, R] (Hugging Face after unsqueeze(1)).
    for c, s in ((cos[0], sin[0]), (cos[:, None], sin[:, None])):
        torch.testing.assert_close(
            kernel.launch_rotary(x, c, s), rotary_reference(x, cos, sin), atol=2e-3, rtol=2e-3
        )
    wide = _x((1, 2, 6, 32), torch.float32)[..., ::2]  # feature stride 2: copied first
    cos32, sin32 = _tables(1, 6, 16, torch.float32)
    torch.testing.assert_close(
        kernel.launch_rotary(wide, cos32, sin32), rotary_reference(wide, cos32, sin32)
    )


def test_tables_with_unequal_halves_follow_the_formula():
    # The kernel reads both halves of cos/sin, so it is exact to the formula for any table.
    x = _x((2, 3, 4, 8), torch.float32)
    cos, sin = _x((2, 4, 8), torch.float32, seed=1), _x((2, 4, 8), torch.float32, seed=2)
    torch.testing.assert_close(
        kernel.launch_rotary(x, cos, sin, config=SMALL), rotary_reference(x, cos, sin)
    )


@pytest.mark.parametrize(
    "x_shape, cos_shape, sin_shape, match",
    [
        ((2, 3, 16), (2, 3, 16), (2, 3, 16), r"x must be \[B, H, S, D\]"),
        ((2, 3, 5, 16), (2, 4, 16), (2, 4, 16), r"cos must be \[2 or 1, 5, R\]"),
        ((2, 3, 5, 16), (3, 5, 16), (3, 5, 16), r"cos must be \[2 or 1, 5, R\]"),
        ((2, 3, 5, 16), (1, 5, 16), (1, 5, 8), "cos .* and sin .* differ"),
        ((2, 3, 5, 16), (1, 5, 7), (1, 5, 7), "must be even"),
        ((2, 3, 5, 16), (1, 5, 18), (1, 5, 18), r"in \[2, 16\], got 18"),
    ],
)
def test_bad_shapes_name_the_argument(x_shape, cos_shape, sin_shape, match):
    x, cos, sin = (torch.zeros(s, device=DEVICE) for s in (x_shape, cos_shape, sin_shape))
    with pytest.raises(CodegenError, match=match):
        kernel.launch_rotary(x, cos, sin)


def test_bad_dtype_names_the_argument():
    x = torch.zeros(1, 1, 2, 8, device=DEVICE)
    with pytest.raises(CodegenError, match="sin has dtype torch.int64"):
        kernel.launch_rotary(
            x,
            torch.zeros(1, 2, 8, device=DEVICE),
            torch.zeros(1, 2, 8, dtype=torch.int64, device=DEVICE),
        )


def test_choose_config_regimes():
    prefill = choose_config(1, 32, 4096, 128)
    assert (
        prefill.block_s == 16 and prefill.heads == 8
    )  # 16 x 128 per head step, cos/sin shared by 8
    decode = choose_config(64, 32, 1, 128)
    assert decode.block_s == 1 and decode.heads < 8  # fewer heads per program: keep SMs busy
    partial = choose_config(1, 32, 2048, 128, 32)
    assert partial.block_s * (32 + 128) <= 2048  # the pass-through block counts in the tile
    for config in (prefill, decode, partial):
        assert all(v & (v - 1) == 0 for v in (config.block_s, config.heads, config.num_warps))


def test_cost():
    flops, moved = cost(1, 32, 4096, 128)
    assert flops == 3 * 32 * 4096 * 128
    assert moved == 2 * 32 * 4096 * 128 * 2 + 2 * 4096 * 128 * 2


def test_package_does_not_import_triton():
    code = "import sys, kompakt.codegen.rotary; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_builds_without_spills(arch):
    from kompakt.codegen.aot import compile_variants

    for built in compile_variants(aot_variants(arch)):
        print(built.summary(), built.variant.constants, f"num_warps={built.variant.num_warps}")
        assert built.registers > 0 and ".visible .entry rotary_kernel" in built.ptx
        assert built.spill_stores == 0 and built.spill_loads == 0
        assert not built.uses_mma and not built.uses_wgmma
        if built.variant.constants["BLOCK_S"] > 1:  # prefill: 16-byte vectors; decode (one
            assert built.widest_load_bits == 128  # position a program) is latency-bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape", [(2, 32, 1000, 128, 128), (64, 32, 1, 128, 128), (1, 32, 777, 80, 32)], ids=str
)
def test_real_sizes_on_gpu(dtype, shape):
    batch, heads, seq, head_dim, rotary_dim = shape
    x = _x((batch, seq, heads, head_dim), dtype).transpose(1, 2)
    cos, sin = _tables(batch, seq, rotary_dim, dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOLERANCE[dtype]
    torch.testing.assert_close(
        kernel.launch_rotary(x, cos, sin), rotary_reference(x, cos, sin), **tol
    )
