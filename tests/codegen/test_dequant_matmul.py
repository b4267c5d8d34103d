"""The dequant-matmul family: packing, Triton kernels (interpreter) vs the reference, and AOT."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _launch_spy import LaunchSpy

from kompakt.codegen.aot import compile_variants
from kompakt.codegen.dequant_matmul import Config, choose_config, pack, unpack
from kompakt.codegen.dequant_matmul.reference import dequant_matmul_reference
from kompakt.codegen.dequant_matmul.spec import aot_variants
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.dequant_matmul.kernel")


def _quantized(k, n, group, bits, signed=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if bits == 4:
        lo, hi = (-8, 8) if signed else (0, 16)
    else:
        lo, hi = (-128, 128) if signed else (0, 256)
    dtype = torch.int8 if signed else torch.uint8
    groups = -(-k // group)
    q = torch.randint(lo, hi, (k, n), generator=g).to(dtype)
    scale = torch.rand(groups, n, generator=g) * 0.1 + 0.01
    zero = torch.randint(lo, hi, (groups, n), generator=g).to(dtype)
    return q, scale, zero


def _onnx_dequant(q, scale, zero, group):
    """What ONNX DequantizeLinear(axis=0, block_size=group) gives, computed independently."""
    k = q.shape[0]
    z = zero.to(torch.int32).repeat_interleave(group, 0)[:k]
    return (q.to(torch.int32) - z).float() * scale.repeat_interleave(group, 0)[:k]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("k, group", [(40, 16), (64, 32), (20, 20)])
def test_pack_round_trips_onnx_dequantization(bits, signed, k, group):
    q, scale, zero = _quantized(k, 6, group, bits, signed)
    packed = pack(q, scale, zero, bits, group, torch.float32)
    assert torch.equal(unpack(packed), _onnx_dequant(q, scale, zero, group))
    if bits == 4:  # eight nibbles per int32; K padded to whole groups (and to 8)
        assert packed.qweight.shape == (packed.scales.shape[0] * packed.group_size // 8, 6)
        assert packed.qweight.shape[0] * 8 < k + max(group, 8)


def test_pack_symmetric_and_per_channel_scale():
    q, scale, _ = _quantized(24, 5, 24, 4)
    packed = pack(q, scale[0], None, 4, 128, torch.float32)
    assert packed.scales.shape == (1, 5)
    assert torch.equal(unpack(packed), q.float() * scale[0])


def test_pack_rejects_bad_shapes():
    q, scale, zero = _quantized(32, 4, 16, 4)
    with pytest.raises(CodegenError, match="scale shape"):
        pack(q, scale[:1], zero[:1], 4, 16)
    with pytest.raises(CodegenError, match="3-bit"):
        pack(q, scale, zero, 3, 16)


CASES = [
    # m, k, n, group, bits, dtype, act, bias, residual
    (1, 40, 20, 16, 4, torch.float32, "none", False, False),
    (3, 48, 33, 16, 4, torch.float16, "silu", True, True),
    (5, 64, 33, 32, 8, torch.float32, "gelu", False, True),
    (20, 64, 17, 32, 4, torch.float32, "gelu_tanh", True, False),
    (17, 24, 10, 24, 8, torch.float16, "relu", False, False),
    (130, 32, 9, 32, 4, torch.float16, "none", True, True),
    (8, 40, 24, 40, 4, torch.float32, "none", False, False),  # per channel, K not a tile multiple
    (3, 64, 20, 32, 4, torch.bfloat16, "silu", True, True),  # bf16 (upcast in the interpreter)
]


@pytest.mark.parametrize("m, k, n, group, bits, dtype, act, bias, residual", CASES)
def test_kernel_matches_reference(m, k, n, group, bits, dtype, act, bias, residual):
    q, scale, zero = _quantized(k, n, group, bits, seed=m)
    packed = pack(q, scale, zero, bits, group, dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(m, n, generator=g).to(dtype) if residual else None
    y = kernel.launch_dequant_matmul(x, packed, b, act, r)
    expected = dequant_matmul_reference(x, packed, b, act, r)
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol * 10)
    assert y.dtype == dtype and y.shape == (m, n)


@pytest.mark.parametrize(
    "config",
    [
        Config("gemv", 2, 16, 16, split_k=3, num_stages=2),
        Config("splitk", 16, 16, 16, split_k=2, num_stages=2),
        Config("gemm", 32, 32, 32, split_k=1),
    ],
)
def test_every_regime_matches_reference(config):
    q, scale, zero = _quantized(96, 40, 32, 4)
    packed = pack(q, scale, zero, 4, 32, torch.float32)
    x = torch.randn(2, 3, 96)  # leading dims are flattened and restored
    r = torch.randn(2, 3, 40)
    y = kernel.launch_dequant_matmul(x, packed, None, "silu", r, config)
    torch.testing.assert_close(y, dequant_matmul_reference(x, packed, None, "silu", r))
    assert y.shape == (2, 3, 40)


@pytest.mark.parametrize("m", [1, 5, 20])
def test_split_k_in_one_launch_equals_the_two_kernel_reduction(m, monkeypatch):
    """Serial split-K (the last split of a tile reduces) sums the same partials in the same order
    as the reduce kernel: equal bit for bit, with no second launch, and the tile counters are
    back at zero after every launch (a CUDA graph replays the same buffer)."""
    q, scale, zero = _quantized(128, 72, 32, 4, seed=m)
    packed = pack(q, scale, zero, 4, 32, torch.float16)
    x = torch.randn(m, 128).half()
    r = torch.randn(m, 72).half()
    serial = Config("gemv" if m < 16 else "splitk", min(16, 1 << (m - 1).bit_length()), 32, 32,
                    split_k=4, num_stages=2)  # fmt: skip
    launched = []
    real = kernel._reduce_kernel
    monkeypatch.setattr(kernel, "_reduce_kernel", LaunchSpy(real, launched))
    one = kernel.launch_dequant_matmul(x, packed, None, "silu", r, serial)
    again = kernel.launch_dequant_matmul(x, packed, None, "silu", r, serial)
    assert launched == []  # reduced inside the main kernel
    counters = kernel.tile_counters(x.device, 1)
    assert int(counters.abs().sum()) == 0
    two = kernel.launch_dequant_matmul(
        x, packed, None, "silu", r, dataclasses.replace(serial, serial_reduce=False)
    )
    assert len(launched) == 1
    assert torch.equal(one, two) and torch.equal(one, again)
    want = dequant_matmul_reference(x, packed, None, "silu", r)
    torch.testing.assert_close(one.float(), want.float(), rtol=2e-2, atol=0.2)


@pytest.mark.parametrize(
    "config",
    [
        None,  # the heuristic
        Config("gemv", 1, 16, 16, split_k=3, num_stages=2),
        Config("gemv", 2, 16, 16, split_k=3, num_stages=2, serial_reduce=False),
        Config("splitk", 16, 32, 16, split_k=2, num_stages=2),
        Config("gemm", 32, 32, 32),
    ],
    ids=["default", "gemv-serial", "gemv-two-kernels", "splitk", "gemm"],
)
@pytest.mark.parametrize("act", ["glu_silu", "glu_gelu", "glu_gelu_tanh"])
def test_gated_epilogue_is_the_glu_of_the_interleaved_halves(config, act):
    """A merged [gate | up] weight, its columns interleaved, computes act(gate) * up in the
    epilogue: the same as the unfused GEMM followed by the GLU, N/2 columns out (F = 20: the
    last tile is partial)."""
    from kompakt.codegen.dequant_matmul import interleave_halves
    from kompakt.codegen.dequant_matmul.reference import activation

    q, scale, zero = _quantized(64, 40, 32, 4, seed=3)
    plain = pack(q, scale, zero, 4, 32, torch.float32)
    merged = pack(*(interleave_halves(t) for t in (q, scale, zero)), 4, 32, torch.float32)
    bias = torch.randn(40)
    for m in (1, 5):
        x = torch.randn(m, 64)
        y = kernel.launch_dequant_matmul(x, merged, interleave_halves(bias), act, None, config)
        unfused = dequant_matmul_reference(x, plain, bias)
        gate, up = unfused.split(20, dim=-1)
        want = activation(gate, act.removeprefix("glu_")) * up
        assert y.shape == (m, 20)
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        ref = dequant_matmul_reference(x, merged, interleave_halves(bias), act)
        torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(CodegenError, match="needs an even N"):
        odd = pack(q[:, :39], scale[:, :39], zero[:, :39], 4, 32, torch.float32)
        kernel.launch_dequant_matmul(torch.randn(1, 64), odd, act=act)


def test_tile_counters_are_shared_and_bounded():
    from kompakt.codegen.counters import MAX_COUNTED_TILES, tile_counters

    device = torch.device("cpu")
    assert tile_counters(device, 10) is tile_counters(device, 20)
    assert tile_counters(device, MAX_COUNTED_TILES + 1) is None


def test_kernel_errors_name_the_argument():
    q, scale, zero = _quantized(32, 8, 16, 4)
    packed = pack(q, scale, zero, 4, 16, torch.float32)
    with pytest.raises(CodegenError, match="K = 32"):
        kernel.launch_dequant_matmul(torch.randn(2, 30), packed)
    with pytest.raises(CodegenError, match="residual shape"):
        kernel.launch_dequant_matmul(torch.randn(2, 32), packed, residual=torch.randn(3, 8))
    with pytest.raises(CodegenError, match="activation"):
        kernel.launch_dequant_matmul(torch.randn(2, 32), packed, act="swish")


def test_choose_config_regimes():
    regimes = {m: choose_config(m, 4096, 4096, 128).regime for m in (1, 8, 16, 17, 128, 129)}
    assert regimes == {1: "gemv", 8: "gemv", 16: "gemv", 17: "splitk", 128: "splitk", 129: "gemm"}
    one = choose_config(1, 4096, 4096, 128, arch="sm_80")
    assert not one.use_dot and one.split_k > 1  # one row: split K to reach every SM
    assert choose_config(1, 4096, 4096, 64).block_k == 64  # a tile never straddles two groups
    for m in (1, 2):  # no tensor cores: the product tile stays at 8192 fp32 values
        c = choose_config(m, 4096, 4096, 128)
        assert not c.use_dot and c.block_m * c.block_k * c.block_n <= 8192
    for m in (3, 4, 8, 16):  # a register tile this tall could not load the weight in 16 bytes
        c = choose_config(m, 4096, 4096, 128)
        assert c.regime == "gemv" and c.use_dot and c.block_m == 16
    with pytest.raises(CodegenError, match="multiple of 16"):
        choose_config(1, 64, 64, 8)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_compiles_every_regime_with_tensor_cores(arch):
    built = compile_variants(aot_variants(arch))
    for b in built:
        print(b.summary(), "BLOCK_M =", b.variant.constants["BLOCK_M"])
        dot = b.variant.constants["USE_DOT"]
        if not dot:
            assert not (b.uses_mma or b.uses_wgmma)
        elif arch == "sm_90" and b.variant.constants["BLOCK_M"] >= 64:
            assert b.uses_wgmma
        else:
            assert b.uses_mma
        assert b.spill_stores == 0, b.summary()
        # Every regime reads the packed weight (and x) in 16-byte vectors at these sizes: what
        # the GEMV's share of copy bandwidth depends on.
        assert b.widest_load_bits == 128, b.summary()
        if b.variant.constants["SERIAL_REDUCE"]:  # split-K reduced by the last split
            atom = b.ptx.index("atom.global.gpu.acq_rel.add")  # releases the partials
            assert "ld.global.cg" in b.ptx[atom:]  # partials read past L1
            assert "atom.global.gpu.relaxed.exch" in b.ptx[atom:]  # counter re-armed


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_gpu_split_k_in_one_launch_at_real_sizes(m):
    """The memory ordering the interpreter cannot show: at Llama sizes, many back-to-back
    launches reduced by their last split equal the two-kernel sum bit for bit, every time."""
    q, scale, zero = _quantized(4096, 11008, 128, 4)
    packed = pack(q, scale, zero, 4, 128, torch.float16)
    packed = dataclasses.replace(
        packed, **{f: getattr(packed, f).cuda() for f in ("qweight", "scales", "zeros")}
    )
    x = torch.randn(m, 4096, device="cuda").half()
    r = torch.randn(m, 11008, device="cuda").half()
    config = choose_config(m, 11008, 4096, 128)
    assert config.split_k > 1 and config.serial_reduce
    two = kernel.launch_dequant_matmul(
        x, packed, None, "none", r, dataclasses.replace(config, serial_reduce=False)
    )
    for _ in range(50):
        assert torch.equal(kernel.launch_dequant_matmul(x, packed, None, "none", r, config), two)
    counters = kernel.tile_counters(x.device, 1)
    assert int(counters.abs().sum()) == 0
    want = dequant_matmul_reference(x, packed, None, "none", r)
    torch.testing.assert_close(two.float(), want.float(), rtol=2e-2, atol=0.5)
