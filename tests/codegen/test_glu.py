"""The glu family: SwiGLU / GeGLU kernels against the torch reference (Triton's interpreter on
CPU), the packed form, bad inputs, the launch heuristic, and ahead-of-time builds for sm_80 and
sm_90."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.codegen.glu import KINDS, Config, aot_variants, choose_config, cost
from kompakt.codegen.glu.reference import glu_packed_reference, glu_reference
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.glu.kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# 2 x 16 tiles: F = 37 takes 3 column blocks with a masked tail, odd row counts a masked row.
SMALL = Config(block_m=2, block_f=16, num_warps=1)
SHAPES = [(3, 5, 37), (1, 48), (1, 1, 1)]


def _randn(shape, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def test_reference_formulas():
    g, u = _randn((64,), torch.float32), _randn((64,), torch.float32, seed=1)
    torch.testing.assert_close(glu_reference(g, u, "silu"), g / (1 + torch.exp(-g)) * u)
    erf_gelu = 0.5 * g * (1 + torch.erf(g / 2**0.5))
    torch.testing.assert_close(glu_reference(g, u, "gelu"), erf_gelu * u)
    tanh_gelu = 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))
    torch.testing.assert_close(glu_reference(g, u, "gelu_tanh"), tanh_gelu * u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_glu_matches_reference(dtype, kind, shape, config):
    gate, up = _randn(shape, dtype), _randn(shape, dtype, scale=1.0, seed=1)
    got = kernel.launch_glu(gate, up, kind, config=config)
    assert got.dtype == dtype and got.shape == gate.shape
    torch.testing.assert_close(got, glu_reference(gate, up, kind), **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", [None, SMALL], ids=["default", "small"])
def test_glu_packed_matches_reference(dtype, kind, config):
    x = _randn((3, 5, 2 * 37), dtype)
    got = kernel.launch_glu_packed(x, kind, config=config)
    assert got.shape == (3, 5, 37) and got.is_contiguous()
    torch.testing.assert_close(got, glu_packed_reference(x, kind), **TOLERANCE[dtype])


def test_strided_inputs():
    base = _randn((6, 40), torch.float16)
    gate, up = base[::2, :33], base[1::2, 5:38]  # row strides 80, unit column stride: in place
    torch.testing.assert_close(
        kernel.launch_glu(gate, up, "silu"), glu_reference(gate, up, "silu"), atol=2e-3, rtol=2e-3
    )
    packed = _randn((4, 2, 20), torch.float32).transpose(0, 1)  # [2, 4, 20]: rows not uniform
    torch.testing.assert_close(
        kernel.launch_glu_packed(packed, "gelu"), glu_packed_reference(packed, "gelu")
    )


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, in the interpreter
def test_saturates_without_nan():
    # Large |gate|: the cubic in tanh-GELU and exp in the sigmoids must saturate, not overflow.
    gate = torch.tensor([-60000.0, -300.0, -20.0, 0.0, 20.0, 300.0, 60000.0], device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        g, u = gate.to(dtype), torch.ones_like(gate, dtype=dtype)
        for kind in KINDS:
            got = kernel.launch_glu(g, u, kind)
            assert not got.isnan().any(), (kind, dtype, got)
            torch.testing.assert_close(got, glu_reference(g, u, kind), **TOLERANCE[dtype])


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: kernel.launch_glu(torch.zeros(2, 8), torch.zeros(2, 8), "relu"),
            "unknown kind 'relu'",
        ),
        (
            lambda: kernel.launch_glu(torch.zeros(2, 8), torch.zeros(2, 9), "silu"),
            r"same \[..., F\]",
        ),
        (
            lambda: kernel.launch_glu(
                torch.zeros(2, 8), torch.zeros(2, 8, dtype=torch.float16), "silu"
            ),
            "up has dtype",
        ),
        (
            lambda: kernel.launch_glu(
                torch.zeros(2, 8, dtype=torch.int8), torch.zeros(2, 8), "silu"
            ),
            "gate has dtype",
        ),
        (lambda: kernel.launch_glu_packed(torch.zeros(2, 7), "silu"), "even last dim"),
        (lambda: kernel.launch_glu_packed([1.0, 2.0], "gelu"), "x must be a torch.Tensor"),
    ],
    ids=["kind", "shape", "dtype-mismatch", "int-dtype", "odd-packed", "not-a-tensor"],
)
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises(CodegenError, match=match):
        call()


def test_choose_config_regimes():
    prefill = choose_config(4096, 11008)
    assert (prefill.block_m, prefill.block_f, prefill.num_warps) == (2, 1024, 4)
    decode = choose_config(1, 11008)
    assert decode.block_m == 1 and decode.block_f < 1024  # more column blocks for one row
    tiny = choose_config(1, 7)
    assert tiny.block_f == 8 and tiny.num_warps == 1


def test_cost():
    assert cost(4096, 11008, "silu") == (6 * 4096 * 11008, 3 * 4096 * 11008 * 2)
    assert cost(1, 11008, "gelu_tanh", itemsize=4)[1] == 3 * 11008 * 4


def test_package_does_not_import_triton():
    code = "import sys, kompakt.codegen.glu; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_builds_without_spills(arch):
    from kompakt.codegen.aot import compile_variants

    for built in compile_variants(aot_variants(arch)):
        print(built.summary(), built.variant.constants, f"num_warps={built.variant.num_warps}")
        assert built.registers > 0 and ".visible .entry glu_kernel" in built.ptx
        assert built.spill_stores == 0 and built.spill_loads == 0
        assert not built.uses_mma and not built.uses_wgmma
        # gate and up (halves of one merged row, stride 2F) load in 16-byte vectors
        assert built.widest_load_bits == 128


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_rows", [1, 1000])
def test_real_sizes_on_gpu(dtype, kind, n_rows):
    x = _randn((n_rows, 2 * 11008), dtype)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOLERANCE[dtype]
    torch.testing.assert_close(
        kernel.launch_glu_packed(x, kind), glu_packed_reference(x, kind), **tol
    )
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(
        kernel.launch_glu(gate, up, kind), glu_reference(gate, up, kind), **tol
    )
