"""The norm family: RMSNorm / LayerNorm kernels against the torch reference (Triton's interpreter
on CPU), bad inputs, the launch heuristic, and ahead-of-time builds for sm_80 and sm_90."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kompakt.codegen.norm import Config, aot_variants, choose_config, cost
from kompakt.codegen.norm.reference import layer_norm_reference, rms_norm_reference
from kompakt.errors import CodegenError

kernel = pytest.importorskip("kompakt.codegen.norm.kernel")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: a few ulps of a different summation order. fp16: one ulp of the output (2^-10 relative).
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
# Row-streaming tiles (16 features, 2 rows per program), so D = 37 takes 3 chunks and odd row
# counts leave a masked row: exercises the > MAX_ONE_BLOCK regime at a size the interpreter runs.
STREAMING = Config(block_d=16, rows=2, num_warps=1)


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)  # a non-zero mean for LayerNorm
    residual = torch.randn(shape, generator=g).to(dtype)
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    bias = torch.randn(shape[-1], generator=g).to(dtype)
    return [t.to(DEVICE) for t in (x, residual, weight, bias)]


def test_references_match_torch():
    x, _, w, b = (t.float().cpu() for t in _inputs((4, 37), torch.float32))
    expected = torch.nn.functional.layer_norm(x, (37,), w, b, eps=1e-5)
    torch.testing.assert_close(layer_norm_reference(x, w, b, 1e-5), expected)
    rms = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6), rms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 1, 48), (1, 7)], ids=str)
@pytest.mark.parametrize("config", [None, STREAMING], ids=["default", "streaming"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(dtype, shape, config, with_residual):
    x, residual, w, _ = _inputs(shape, dtype)
    residual = residual if with_residual else None
    got = kernel.launch_rms_norm(x, w, 1e-6, residual=residual, config=config)
    want = rms_norm_reference(x, w, 1e-6, residual=residual)
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # the sum is exact
        got, want = got[0], want[0]
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 1, 48), (1, 7)], ids=str)
@pytest.mark.parametrize("config", [None, STREAMING], ids=["default", "streaming"])
@pytest.mark.parametrize("variant", ["residual+bias", "plain", "no-bias"])
def test_layer_norm_matches_reference(dtype, shape, config, variant):
    x, residual, w, b = _inputs(shape, dtype)
    residual = residual if variant == "residual+bias" else None
    b = None if variant == "no-bias" else b
    got = kernel.launch_layer_norm(x, w, b, 1e-5, residual=residual, config=config)
    want = layer_norm_reference(x, w, b, 1e-5, residual=residual)
    if residual is not None:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
        got, want = got[0], want[0]
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


def test_strided_rows_and_fp32_weight_with_fp16_x():
    x, residual, w, _ = _inputs((6, 40), torch.float16)
    rows = x[::2, :33]  # row stride 80, unit feature stride: used in place
    got = kernel.launch_rms_norm(rows, w[:33].float(), 1e-6)
    torch.testing.assert_close(
        got, rms_norm_reference(rows, w[:33].float(), 1e-6), atol=2e-3, rtol=2e-3
    )
    columns = x.t()  # feature stride 40: copied to rows first
    got = kernel.launch_layer_norm(columns, w[:6], None, 1e-5)
    want = layer_norm_reference(columns, w[:6], None, 1e-5)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_no_rows():
    x, _, w, _ = _inputs((0, 16), torch.float32)
    assert kernel.launch_rms_norm(x, w, 1e-6).shape == (0, 16)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.zeros(2, 8, dtype=torch.int32)), "x has dtype torch.int32"),
        (dict(x=torch.zeros(2, 0)), r"D > 0"),
        (dict(weight=torch.ones(9)), r"weight must be \[8\]"),
        (dict(bias=torch.ones(2, 8)), r"bias must be \[8\]"),
        (dict(residual=torch.zeros(2, 9)), "residual shape"),
        (dict(residual=torch.zeros(2, 8, dtype=torch.float16)), "residual has dtype"),
        (dict(eps=-1.0), "eps must be >= 0"),
        (dict(weight="w"), "weight must be a torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(change, match):
    args = dict(
        x=torch.zeros(2, 8), weight=torch.ones(8), bias=torch.zeros(8), eps=1e-5, residual=None
    )
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(CodegenError, match=match):
        kernel.launch_layer_norm(**args)


def test_choose_config_regimes():
    for d in (7, 128, 4096, 8192, 16384):
        config = choose_config(4096, d)
        assert config.one_block(d) and config.block_d < 2 * d
        assert (
            config.num_warps & (config.num_warps - 1) == 0 and config.rows & (config.rows - 1) == 0
        )
    assert choose_config(65536, 128).rows > 1  # short rows are packed
    assert choose_config(8, 128).rows == 1  # ...unless that leaves SMs idle
    streaming = choose_config(64, 32768)
    assert not streaming.one_block(32768) and streaming.rows == 1


def test_cost():
    flops, moved = cost(4096, 4096)
    assert flops == 4 * 4096 * 4096 and moved == 2 * 4096 * 4096 * 2 + 4096 * 2
    assert cost(4096, 4096, residual=True)[1] > moved
    assert cost(4096, 4096, layer_norm=True)[0] > flops


def test_package_does_not_import_triton():
    code = "import sys, kompakt.codegen.norm; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_aot_builds_without_spills(arch):
    from kompakt.codegen.aot import compile_variants

    for built in compile_variants(aot_variants(arch)):
        print(built.summary(), built.variant.constants, f"num_warps={built.variant.num_warps}")
        assert built.registers > 0 and ".visible .entry norm_kernel" in built.ptx
        assert built.spill_stores == 0 and built.spill_loads == 0
        assert not built.uses_mma and not built.uses_wgmma
        assert built.widest_load_bits == 128  # rows load in 16-byte vectors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [4096, 5120, 32768])
def test_real_sizes_on_gpu(dtype, d):
    x, residual, w, b = (t.cuda() for t in _inputs((2, 257, d), dtype))
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else TOLERANCE[dtype]
    got, summed = kernel.launch_rms_norm(x, w, 1e-6, residual=residual)
    want, want_summed = rms_norm_reference(x, w, 1e-6, residual=residual)
    torch.testing.assert_close(summed, want_summed, atol=0, rtol=0)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(
        kernel.launch_layer_norm(x, w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5), **tol
    )
