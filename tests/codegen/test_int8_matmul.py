"""int8 (W8A8) matmul family: interpreter numerics, bad inputs, heuristics, sm_80/sm_90 builds.

The tests it shares with the fp8 family are in `_gemm_cases.ScaledMatmulTests`; here are its
family (`FAMILY`) and what only int8 has: per-token quantization, its arch gate, sm_80 builds.
"""

from __future__ import annotations

import _gemm_cases as cases
import pytest
import torch

from kompakt.codegen.int8_matmul import reference as ref
from kompakt.codegen.int8_matmul import spec
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.int8_matmul.kernel")


def _quantize(x: torch.Tensor, per_row: bool):
    """Per token by the kernel; per tensor as static calibration would give (there is no
    per-tensor quantize kernel in this family)."""
    if per_row:
        return kernel.launch_quantize_per_token(x)
    x_scale = x.abs().max() / 127
    return torch.round(x / x_scale).clamp(-127, 127).to(torch.int8), x_scale


FAMILY = cases.Family(
    package="int8_matmul",
    spec=spec,
    operand=torch.int8,
    wrong_operands=(torch.float32, torch.uint8),
    quantize=_quantize,
    quantize_reference=lambda x, per_row: ref.quantize_per_token_reference(x),
    quantize_weight=ref.quantize_weight_reference,
    matmul=kernel.launch_int8_matmul,
    reference=ref.int8_matmul_reference,
    random_q=lambda shape, gen: torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen),
    # int32 sums are exact: only the fp32 epilogue rounds (two products and an add)
    epilogue_rtol=4e-7,
    quantization_error=0.05,
    small_smem_arch="sm_86",
    min_capability=(8, 0),
    gpu_granularities=(True,),
)


class TestInt8Matmul(cases.ScaledMatmulTests):
    family = FAMILY


@pytest.mark.parametrize("dtype", cases.DTYPES)
@pytest.mark.parametrize("shape", cases.QUANT_SHAPES)
def test_quantize_per_token_matches_reference(dtype, shape):
    x = cases.quant_input(shape, dtype, seed=1, gain=3)
    got = kernel.launch_quantize_per_token(x)
    cases.check_quantize(FAMILY, got, ref.quantize_per_token_reference(x), shape)


def test_quantize_rounds_half_to_even():
    halves = torch.arange(-126, 126, dtype=torch.float32) + 0.5
    x = torch.cat([torch.tensor([127.0]), halves]).reshape(1, -1)  # amax 127: scale exactly 1
    xq, scale = kernel.launch_quantize_per_token(x)
    assert scale.item() == 1.0
    assert torch.equal(xq[0, 1:], torch.round(halves).to(torch.int8))


def test_bad_quantize_input():
    with pytest.raises(CodegenError, match="x must be fp16, bf16 or fp32"):
        kernel.launch_quantize_per_token(torch.zeros(2, 4, dtype=torch.int32))


def test_arch_gate():
    assert spec.choose_config(4096, 4096, 4096, "sm_80").num_stages >= 2
    with pytest.raises(CodegenError, match="sm_80 or newer"):
        spec.choose_config(1, 64, 64, "sm_75")
    with pytest.raises(CodegenError, match="arch must look like"):
        spec.choose_config(1, 64, 64, "hopper")


@pytest.fixture(scope="module")
def built():
    from kompakt.codegen.aot import compile_variants

    return compile_variants(spec.aot_variants("sm_80") + spec.aot_variants("sm_90"))


def test_aot_builds_for_sm80_and_sm90(built):
    cases.check_builds(built, marks=("s8", "s32"))  # int8 operands, int32 accumulator
    assert {b.variant.arch for b in built} == {"sm_80", "sm_90"}
