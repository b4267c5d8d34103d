"""fp8 (e4m3) matmul family: interpreter numerics, sm_89+ gating, bad inputs, sm_90 builds.

The tests it shares with the int8 family are in `_gemm_cases.ScaledMatmulTests`; here are its
family (`FAMILY`) and what only fp8 has: e4m3 quantization per row and per tensor, the sm_89 gate.
"""

from __future__ import annotations

import _gemm_cases as cases
import pytest
import torch

from kompakt.codegen.fp8_matmul import reference as ref
from kompakt.codegen.fp8_matmul import spec
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.fp8_matmul.kernel")

FP8 = torch.float8_e4m3fn

FAMILY = cases.Family(
    package="fp8_matmul",
    spec=spec,
    operand=FP8,
    wrong_operands=(torch.int8, torch.float8_e5m2),
    quantize=kernel.launch_quantize_fp8,
    quantize_reference=ref.quantize_fp8_reference,
    quantize_weight=ref.quantize_fp8_weight_reference,
    matmul=kernel.launch_fp8_matmul,
    reference=ref.fp8_matmul_reference,
    random_q=lambda shape, gen: (torch.randn(shape, generator=gen) * 100).clamp(-448, 448).to(FP8),
    # fp8 x fp8 products are exact in fp32; only the fp32 sum and the epilogue round
    epilogue_rtol=2e-6,
    quantization_error=0.1,
    small_smem_arch="sm_89",
    min_capability=(8, 9),
    gpu_granularities=(True, False),
)


class TestFp8Matmul(cases.ScaledMatmulTests):
    family = FAMILY


@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "per-tensor"])
@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("shape", cases.QUANT_SHAPES)
def test_quantize_matches_reference(per_row, dtype, shape):
    x = cases.quant_input(shape, dtype, seed=2, gain=5)
    got = kernel.launch_quantize_fp8(x, per_row)
    cases.check_quantize(FAMILY, got, ref.quantize_fp8_reference(x, per_row), shape, per_row)


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
    assert torch.equal(xq.float(), x.to(FP8).float())  # torch's cast rounds to nearest even


def test_bad_quantize_input():
    with pytest.raises(CodegenError, match="x must be fp16, bf16 or fp32"):
        kernel.launch_quantize_fp8(torch.zeros(2, 4, dtype=torch.int32), per_row=True)


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


@pytest.fixture(scope="module")
def built():
    from kompakt.codegen.aot import compile_variants

    return compile_variants(spec.aot_variants("sm_90"))


def test_aot_builds_for_sm90(built):
    for b in built:
        if b.variant.kernel.endswith(":quantize_rows_kernel"):
            assert "e4m3" in b.ptx  # the hardware cvt to e4m3
    for b in cases.check_builds(built, marks=("e4m3",)):
        if b.variant.constants["BLOCK_M"] >= 64:
            assert ".e4m3.e4m3" in b.ptx  # wgmma on fp8 operands, not widened ones
