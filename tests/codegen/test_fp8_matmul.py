"""fp8 (e4m3) matmul family: interpreter numerics, sm_89+ gating, bad inputs, sm_90 builds."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.codegen.fp8_matmul import reference as ref
from kompakt.codegen.fp8_matmul import spec
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.fp8_matmul.kernel")

FP8 = torch.float8_e4m3fn
SMALL = spec.Config(16, 16, 32, group_m=2)  # several programs and K steps at tiny shapes


def _operands(m, n, k, x_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    wq, w_scale = ref.quantize_fp8_weight_reference(torch.randn(k, n, generator=gen))
    bias = torch.randn(n, generator=gen).to(x_dtype)
    return x, wq, w_scale, bias


def _exact(xq, x_scale, wq, w_scale, bias):
    """The product of the same fp8 values in float64 (exact for these sizes), then scaled."""
    xq, x_scale, wq, w_scale = (t.cpu() for t in (xq, x_scale, wq, w_scale))
    acc = xq.reshape(-1, xq.shape[-1]).double() @ wq.double()
    xs = x_scale.double().reshape(-1, 1) if x_scale.dim() else x_scale.double()
    y = acc * xs * w_scale.double()
    return y if bias is None else y + bias.double().cpu()


def _same_fp8(a, b):
    """Equal values (+0 and -0 alike), as floats."""
    return a.dtype == b.dtype == FP8 and torch.equal(a.float(), b.float())


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kompakt.codegen.fp8_matmul as f\n"
        "f.choose_config(1, 64, 64); f.cost(1, 64, 64)\n"
        "assert 'kompakt.codegen.fp8_matmul.kernel' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (1, 1, 33), (2, 3, 48), (2, 5000)])
def test_quantize_matches_reference(per_row, dtype, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype) * 5
    if shape[0] > 1:
        x[1] = 0  # an all-zero row: scale 1 per row
    xq, scale = kernel.launch_quantize_fp8(x, per_row)
    want_q, want_scale = ref.quantize_fp8_reference(x, per_row)
    assert xq.shape == shape and scale.shape == (shape[:-1] if per_row else ())
    assert torch.equal(scale, want_scale)
    assert _same_fp8(xq, want_q)


def test_quantize_zero_tensor_per_tensor():
    xq, scale = kernel.launch_quantize_fp8(torch.zeros(3, 20), per_row=False)
    assert scale.item() == 1.0 and not xq.float().any()


def test_quantize_rounds_onto_the_e4m3_grid_half_to_even():
    grid = torch.arange(0x7F, dtype=torch.uint8).view(FP8).float()  # 0 .. 448, subnormals too
    ties = (grid[1:] + grid[:-1]) / 2  # exactly halfway: must go to the even mantissa
    near = torch.cat([ties * (1 + 2**-20), ties * (1 - 2**-20)])  # just off the ties
    values = torch.cat([grid, ties, near, torch.tensor([1e-7, 2.0**-10])])
    x = torch.cat([torch.tensor([448.0]), values, -values]).reshape(1, -1)  # amax 448: scale 1
    xq, scale = kernel.launch_quantize_fp8(x, per_row=True)
    assert scale.item() == 1.0
    assert _same_fp8(xq, x.to(FP8))  # torch's cast rounds to nearest even


@pytest.mark.parametrize("m,n,k", [(1, 40, 72), (33, 40, 64), (20, 17, 100)])
def test_fp32_accumulate(m, n, k):
    gen = torch.Generator().manual_seed(m)
    xq = (torch.randn(m, k, generator=gen) * 100).clamp(-448, 448).to(FP8)
    wq = (torch.randn(k, n, generator=gen) * 100).clamp(-448, 448).to(FP8)
    x_scale = torch.rand(m, generator=gen) + 0.5
    w_scale = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    y = kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, bias, torch.float32, config=SMALL)
    want = _exact(xq, x_scale, wq, w_scale, bias)
    # fp8 x fp8 products are exact in fp32; only the fp32 sum and the epilogue round
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=2e-6 * want.abs().max().item())


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 20, 70])
@pytest.mark.parametrize("config", [None, SMALL], ids=["heuristic", "small-tiles"])
def test_matmul_matches_reference(x_dtype, m, config):
    x, wq, w_scale, bias = _operands(m, 40, 72, x_dtype, seed=m)
    xq, x_scale = kernel.launch_quantize_fp8(x, per_row=True)
    y = kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, bias, config=config)
    want = ref.fp8_matmul_reference(xq, x_scale, wq, w_scale, bias)
    assert y.dtype == torch.float16 and y.shape == (m, 40)
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-10, atol=2**-14)


@pytest.mark.parametrize("per_row", [True, False], ids=["x-per-row", "x-per-tensor"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["w-per-channel", "w-per-tensor"])
def test_scale_granularities_without_bias(per_row, per_channel):
    x, _, _, _ = _operands(9, 24, 40, torch.float32, seed=3)
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
    wq, w_scale = ref.quantize_fp8_weight_reference(w, per_channel=per_channel)
    xq, x_scale = kernel.launch_quantize_fp8(x, per_row)
    y = kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, out_dtype=torch.float32, config=SMALL)
    want = _exact(xq, x_scale, wq, w_scale, None)
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=2e-6 * want.abs().max().item())
    # and the quantized product stays close to the float one it stands for
    assert (y - x @ w).abs().max() < 0.1 * (x @ w).abs().max()


def test_batch_one_seq_one():
    x, wq, w_scale, bias = _operands(1, 24, 40, torch.float16)
    xq, x_scale = kernel.launch_quantize_fp8(x.reshape(1, 1, 40), per_row=True)
    assert xq.shape == (1, 1, 40) and x_scale.shape == (1, 1)
    y = kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, bias)
    assert y.shape == (1, 1, 24)
    want = ref.fp8_matmul_reference(xq, x_scale, wq, w_scale, bias)
    torch.testing.assert_close(y, want, rtol=2**-10, atol=2**-14)


def test_sm80_is_refused():
    x = torch.randn(2, 8)
    with pytest.raises(CodegenError, match="fp8 matmul needs sm_89"):
        spec.choose_config(1, 64, 64, arch="sm_80")
    with pytest.raises(CodegenError, match="fp8 matmul needs sm_89"):
        spec.aot_variants("sm_80")
    with pytest.raises(CodegenError, match="fp8 matmul needs sm_89"):
        kernel.launch_quantize_fp8(x, per_row=True, arch="sm_80")
    xq, x_scale = kernel.launch_quantize_fp8(x, per_row=True)
    wq, w_scale = ref.quantize_fp8_weight_reference(torch.randn(8, 4))
    with pytest.raises(CodegenError, match="fp8 matmul needs sm_89"):
        kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, arch="sm_80")
    assert spec.choose_config(1, 64, 64, arch="sm_89").block_m == 16


_GOOD = {
    "xq": torch.zeros(3, 8, dtype=FP8),
    "x_scale": torch.ones(3),
    "wq": torch.zeros(8, 5, dtype=FP8),
    "w_scale": torch.ones(5),
}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"xq": torch.zeros(3, 8, dtype=torch.int8)}, "xq must be torch.float8_e4m3fn"),
        ({"wq": torch.zeros(8, 5, dtype=torch.float8_e5m2)}, "wq must be torch.float8_e4m3fn"),
        ({"wq": torch.zeros(7, 5, dtype=FP8)}, "disagree on K"),
        ({"wq": torch.zeros(8, dtype=FP8)}, "wq [K, N]"),
        ({"x_scale": torch.ones(4)}, "x_scale must be [3] or []"),
        ({"x_scale": torch.ones(3, dtype=torch.float16)}, "x_scale must be float32"),
        ({"w_scale": torch.ones(6)}, "w_scale must be [5] or []"),
        ({"bias": torch.ones(6)}, "bias must be a float [5]"),
        ({"out_dtype": FP8}, "out_dtype must be"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    with pytest.raises(CodegenError, match=message.replace("[", r"\[").replace("]", r"\]")):
        kernel.launch_fp8_matmul(**{**_GOOD, **change})


def test_bad_quantize_input():
    with pytest.raises(CodegenError, match="x must be fp16, bf16 or fp32"):
        kernel.launch_quantize_fp8(torch.zeros(2, 4, dtype=torch.int32), per_row=True)


def test_choose_config_regimes():
    small, mid, large = (spec.choose_config(m, 4096, 4096) for m in (1, 48, 4096))
    assert (small.block_m, mid.block_m, large.block_m) == (16, 64, 128)
    for cfg in (small, mid, large):
        assert cfg.block_k % 32 == 0  # fp8 MMA consumes K in 32s
    # sm_89 has 100 KiB of shared memory: the large tile keeps fewer stages than on sm_90
    assert spec.choose_config(4096, 4096, 4096, "sm_89").num_stages < large.num_stages
    flops, moved = spec.cost(2, 3, 4)
    assert flops == 48 and moved == 8 + 12 + 20 + 12


@pytest.fixture(scope="module")
def built():
    from kompakt.codegen.aot import compile_variants

    return compile_variants(spec.aot_variants("sm_90"))


def test_aot_builds_for_sm90(built):
    for b in built:
        print(b.summary(), {k: b.variant.constants.get(k) for k in ("BLOCK_M", "BLOCK_N")})
        name = b.variant.kernel.rsplit(":", 1)[-1]
        if name == "quantize_fp8_kernel":
            assert "e4m3" in b.ptx  # the hardware cvt to e4m3
        if name != "fp8_matmul_kernel":
            continue
        assert "e4m3" in b.ptx
        if b.variant.constants["BLOCK_M"] >= 64:
            assert b.uses_wgmma, b.summary()
            assert ".e4m3.e4m3" in b.ptx  # wgmma on fp8 operands, not widened ones
        else:
            assert b.uses_mma, b.summary()


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 48, 512])
def test_gpu_matches_reference_at_real_sizes(m):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    x, wq, w_scale, bias = (t.cuda() for t in _operands(m, 4096, 4096, torch.float16))
    for per_row in (True, False):
        xq, x_scale = kernel.launch_quantize_fp8(x, per_row)
        want_q, want_scale = ref.quantize_fp8_reference(x, per_row)
        assert _same_fp8(xq, want_q) and torch.equal(x_scale, want_scale)
    y = kernel.launch_fp8_matmul(xq, x_scale, wq, w_scale, bias)
    want = _exact(xq, x_scale, wq, w_scale, bias).float()
    torch.testing.assert_close(y.float().cpu(), want, rtol=2**-10, atol=1e-3)
