"""int8 (W8A8) matmul family: interpreter numerics, bad inputs, heuristics, sm_80/sm_90 builds."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.codegen.int8_matmul import reference as ref
from kompakt.codegen.int8_matmul import spec
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.int8_matmul.kernel")

SMALL = spec.Config(16, 16, 32, group_m=2)  # several programs and K steps at tiny shapes


def _operands(m, n, k, x_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    wq, w_scale = ref.quantize_weight_reference(torch.randn(k, n, generator=gen))
    bias = torch.randn(n, generator=gen).to(x_dtype)
    return x, wq, w_scale, bias


def _exact(xq, x_scale, wq, w_scale, bias):
    """The product in int64 (exact), scaled in float64: what an exact int32 accumulate gives."""
    xq, x_scale, wq, w_scale = (t.cpu() for t in (xq, x_scale, wq, w_scale))  # no int64 mm on GPU
    acc = (xq.reshape(-1, xq.shape[-1]).long() @ wq.long()).double()
    xs = x_scale.double().reshape(-1, 1) if x_scale.dim() else x_scale.double()
    y = acc * xs * w_scale.double()
    return y if bias is None else y + bias.double().cpu()


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kompakt.codegen.int8_matmul as f\n"
        "f.choose_config(1, 64, 64); f.cost(1, 64, 64)\n"
        "assert 'kompakt.codegen.int8_matmul.kernel' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (1, 1, 33), (2, 3, 48), (2, 5000)])
def test_quantize_per_token_matches_reference(dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype) * 3
    if shape[0] > 1:
        x[1] = 0  # all-zero row: scale 1, zeros
    xq, scale = kernel.launch_quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token_reference(x)
    assert xq.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == shape[:-1] and xq.shape == shape
    assert torch.equal(scale, want_scale)
    assert torch.equal(xq, want_q)


def test_quantize_rounds_half_to_even():
    halves = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), halves]).reshape(1, -1)  # amax 127: scale exactly 1
    xq, scale = kernel.launch_quantize_per_token(x)
    assert scale.item() == 1.0
    assert torch.equal(xq[0, 1:], torch.round(halves).to(torch.int8))


@pytest.mark.parametrize("m,n,k", [(1, 40, 72), (33, 40, 64), (20, 17, 100)])
def test_int32_accumulate_is_exact(m, n, k):
    gen = torch.Generator().manual_seed(m)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)  # full range
    x_scale = torch.rand(m, generator=gen) + 0.5
    wq = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    y = kernel.launch_int8_matmul(xq, x_scale, wq, w_scale, bias, torch.float32, config=SMALL)
    want = _exact(xq, x_scale, wq, w_scale, bias)
    # fp32 epilogue only: two products and an add, each rounded once
    torch.testing.assert_close(y.double(), want, rtol=4e-7, atol=4e-7 * want.abs().max().item())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 20, 70])
@pytest.mark.parametrize("config", [None, SMALL], ids=["heuristic", "small-tiles"])
def test_matmul_matches_reference(x_dtype, m, config):
    x, wq, w_scale, bias = _operands(m, 40, 72, x_dtype, seed=m)
    xq, x_scale = kernel.launch_quantize_per_token(x)
    y = kernel.launch_int8_matmul(xq, x_scale, wq, w_scale, bias, config=config)
    want = ref.int8_matmul_reference(xq, x_scale, wq, w_scale, bias)
    assert y.dtype == torch.float16 and y.shape == (m, 40)
    # within fp16 rounding: the two fp32 paths differ far below half an fp16 step
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-10, atol=2**-14)
    exact = _exact(xq, x_scale, wq, w_scale, bias).float()
    torch.testing.assert_close(y.float(), exact, rtol=2**-10, atol=2**-14)


@pytest.mark.parametrize("per_token", [True, False], ids=["x-per-token", "x-per-tensor"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["w-per-channel", "w-per-tensor"])
def test_scale_granularities_without_bias(per_token, per_channel):
    x, _, _, _ = _operands(9, 24, 40, torch.float32, seed=3)
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
    wq, w_scale = ref.quantize_weight_reference(w, per_channel=per_channel)
    if per_token:
        xq, x_scale = kernel.launch_quantize_per_token(x)
    else:  # static per-tensor activation scale, as calibration would give
        x_scale = x.abs().max() / 127
        xq = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
    y = kernel.launch_int8_matmul(xq, x_scale, wq, w_scale, out_dtype=torch.float32, config=SMALL)
    want = _exact(xq, x_scale, wq, w_scale, None)
    torch.testing.assert_close(y.double(), want, rtol=4e-7, atol=4e-7 * want.abs().max().item())
    # and the quantized product stays close to the float one it stands for
    assert (y - x @ w).abs().max() < 0.05 * (x @ w).abs().max()


def test_batch_one_seq_one():
    x, wq, w_scale, bias = _operands(1, 24, 40, torch.float16)
    xq, x_scale = kernel.launch_quantize_per_token(x.reshape(1, 1, 40))
    assert xq.shape == (1, 1, 40) and x_scale.shape == (1, 1)
    y = kernel.launch_int8_matmul(xq, x_scale, wq, w_scale, bias)
    assert y.shape == (1, 1, 24)
    want = ref.int8_matmul_reference(xq, x_scale, wq, w_scale, bias)
    torch.testing.assert_close(y, want, rtol=2**-10, atol=2**-14)


def test_empty_rows():
    xq, x_scale = kernel.launch_quantize_per_token(torch.zeros(0, 8))
    y = kernel.launch_int8_matmul(xq, x_scale, torch.zeros(8, 4, dtype=torch.int8), torch.ones(4))
    assert y.shape == (0, 4)


_GOOD = {
    "xq": torch.zeros(3, 8, dtype=torch.int8),
    "x_scale": torch.ones(3),
    "wq": torch.zeros(8, 5, dtype=torch.int8),
    "w_scale": torch.ones(5),
}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"xq": torch.zeros(3, 8)}, "xq must be torch.int8"),
        ({"wq": torch.zeros(8, 5, dtype=torch.uint8)}, "wq must be torch.int8"),
        ({"wq": torch.zeros(7, 5, dtype=torch.int8)}, "disagree on K"),
        ({"wq": torch.zeros(8, dtype=torch.int8)}, "wq [K, N]"),
        ({"x_scale": torch.ones(4)}, "x_scale must be [3] or []"),
        ({"x_scale": torch.ones(3, dtype=torch.float16)}, "x_scale must be float32"),
        ({"w_scale": torch.ones(6)}, "w_scale must be [5] or []"),
        ({"bias": torch.ones(6)}, "bias must be a float [5]"),
        ({"out_dtype": torch.int32}, "out_dtype must be"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    with pytest.raises(CodegenError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kernel.launch_int8_matmul(**{**_GOOD, **change})


def test_bad_quantize_input():
    with pytest.raises(CodegenError, match="x must be fp16, bf16 or fp32"):
        kernel.launch_quantize_per_token(torch.zeros(2, 4, dtype=torch.int32))


def test_choose_config_regimes():
    small, mid, large = (spec.choose_config(m, 4096, 4096) for m in (1, 48, 4096))
    assert (small.block_m, mid.block_m, large.block_m) == (16, 64, 128)
    for cfg in (small, mid, large):
        assert cfg.block_k % 32 == 0  # int8 MMA consumes K in 32s
    # sm_86 has 100 KiB of shared memory: the large tile keeps fewer stages than on sm_90
    assert spec.choose_config(4096, 4096, 4096, "sm_86").num_stages < large.num_stages
    assert spec.choose_config(4096, 4096, 4096, "sm_80").num_stages >= 2
    with pytest.raises(CodegenError, match="sm_80 or newer"):
        spec.choose_config(1, 64, 64, "sm_75")
    with pytest.raises(CodegenError, match="arch must look like"):
        spec.choose_config(1, 64, 64, "hopper")
    flops, moved = spec.cost(2, 3, 4)
    assert flops == 48 and moved == 8 + 12 + 20 + 12


@pytest.fixture(scope="module")
def built():
    from kompakt.codegen.aot import compile_variants

    variants = spec.aot_variants("sm_80") + spec.aot_variants("sm_90")
    return compile_variants(variants)


def test_aot_builds_for_sm80_and_sm90(built):
    for b in built:
        print(b.summary(), {k: b.variant.constants.get(k) for k in ("BLOCK_M", "BLOCK_N")})
        name = b.variant.kernel.rsplit(":", 1)[-1]
        if name != "int8_matmul_kernel":
            continue
        assert "s8" in b.ptx and "s32" in b.ptx  # int8 operands, int32 accumulator
        if b.variant.arch == "sm_90" and b.variant.constants["BLOCK_M"] >= 64:
            assert b.uses_wgmma, b.summary()
        else:
            assert b.uses_mma, b.summary()
    assert {b.variant.arch for b in built} == {"sm_80", "sm_90"}


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 48, 512])
def test_gpu_matches_reference_at_real_sizes(m):
    x, wq, w_scale, bias = (t.cuda() for t in _operands(m, 4096, 4096, torch.float16))
    xq, x_scale = kernel.launch_quantize_per_token(x)
    want_q, want_scale = ref.quantize_per_token_reference(x)
    assert torch.equal(xq, want_q) and torch.equal(x_scale, want_scale)
    y = kernel.launch_int8_matmul(xq, x_scale, wq, w_scale, bias)
    want = _exact(xq, x_scale, wq, w_scale, bias).float()
    torch.testing.assert_close(y.float().cpu(), want, rtol=2**-10, atol=1e-3)
