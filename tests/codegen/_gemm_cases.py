"""Tests shared by the int8 and fp8 matmul families (test_int8_matmul.py, test_fp8_matmul.py).

Both families are the scaled one-byte GEMM of `kompakt.codegen.scaled_matmul`, so one set of tests
serves both: each test file subclasses `ScaledMatmulTests` with its `Family` (launchers,
references, operand dtype, tolerances) and adds the tests only its family has (quantize rounding,
arch gates, ahead-of-time builds). This module's name does not start with ``test_``, so pytest
collects the shared tests only through those subclasses.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import pytest
import torch

from kompakt.codegen.scaled_matmul.spec import Config
from kompakt.errors import CodegenError

SMALL = Config(16, 16, 32, group_m=2)  # several programs and K steps at tiny shapes
DTYPES = [torch.float32, torch.float16]  # bf16 arithmetic is wrong in the interpreter
# Not multiples of any block; M = 1, batch 1 x seq 1, and a row past the 4096-value chunk.
QUANT_SHAPES = [(1, 1), (5, 70), (1, 1, 33), (2, 3, 48), (2, 5000)]


@dataclass(frozen=True)
class Family:
    """What the shared tests need to know about one family."""

    package: str  # "int8_matmul": kompakt.codegen.<package>
    spec: ModuleType
    operand: torch.dtype  # of xq and wq
    wrong_operands: tuple[torch.dtype, torch.dtype]  # an xq and a wq dtype the launcher refuses
    quantize: Callable  # (x, per_row) -> (xq, x_scale)
    quantize_reference: Callable  # (x, per_row) -> (xq, x_scale)
    quantize_weight: Callable  # (w, per_channel=True) -> (wq, w_scale)
    matmul: Callable  # the family's launch_*_matmul
    reference: Callable  # the family's *_matmul_reference
    random_q: Callable  # (shape, generator) -> quantized values spanning the format's range
    epilogue_rtol: float  # fp32 output against the exact product: what rounds in the kernel
    quantization_error: float  # the quantized product against the float one, relative to max
    small_smem_arch: str  # an arch with 100 KiB of shared memory
    min_capability: tuple[int, int]
    gpu_granularities: tuple[bool, ...]  # per_row values the quantize kernel is checked at


def operands(fam: Family, m: int, n: int, k: int, x_dtype: torch.dtype, seed: int = 0):
    """x [m, k] float, wq [k, n] quantized per channel with its scale, bias [n]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    wq, w_scale = fam.quantize_weight(torch.randn(k, n, generator=gen))
    bias = torch.randn(n, generator=gen).to(x_dtype)
    return x, wq, w_scale, bias


def exact(xq, x_scale, wq, w_scale, bias):
    """The product of the same quantized values, exact (int64 for int8; float64 for e4m3, exact
    at these sizes), then scaled in float64."""
    xq, x_scale, wq, w_scale = (t.cpu() for t in (xq, x_scale, wq, w_scale))  # no int64 mm on GPU
    a = xq.reshape(-1, xq.shape[-1])
    acc = a.double() @ wq.double() if xq.is_floating_point() else (a.long() @ wq.long()).double()
    xs = x_scale.double().reshape(-1, 1) if x_scale.dim() else x_scale.double()
    y = acc * xs * w_scale.double()
    return y if bias is None else y + bias.double().cpu()


def assert_epilogue_close(y: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """fp32 output against the exact float64 result, to ``rtol`` of the largest value."""
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def assert_fp16_close(y: torch.Tensor, want: torch.Tensor) -> None:
    """Within fp16 rounding: fp32 paths that differ far below half an fp16 step."""
    torch.testing.assert_close(y.float(), want.float(), rtol=2**-10, atol=2**-14)


def quant_input(shape: tuple, dtype: torch.dtype, seed: int, gain: float) -> torch.Tensor:
    """Random x of ``shape``; its second row, where there is one, all zeros (scale 1)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype) * gain
    if shape[0] > 1:
        x[1] = 0
    return x


def check_quantize(fam: Family, got, want, shape: tuple, per_row: bool = True) -> None:
    """The kernel's (xq, scale) equal the reference's bit for bit, in dtype and shape too."""
    (xq, scale), (want_q, want_scale) = got, want
    assert xq.dtype == want_q.dtype == fam.operand and scale.dtype == torch.float32
    assert xq.shape == shape and scale.shape == (shape[:-1] if per_row else ())
    assert torch.equal(scale, want_scale)
    assert torch.equal(xq.float(), want_q.float())  # as floats: e4m3 +0 and -0 alike


def check_builds(built: list, marks: tuple[str, ...]) -> list:
    """Prints every build; asserts the matmul builds name ``marks`` (operand and accumulator
    types) in their PTX and use wgmma on sm_90 at BLOCK_M >= 64, mma.sync otherwise. Returns
    the matmul builds."""
    matmuls = []
    for b in built:
        print(b.summary(), {k: b.variant.constants.get(k) for k in ("BLOCK_M", "BLOCK_N")})
        assert b.widest_load_bits == 128 and b.spill_stores == 0, b.summary()
        if b.variant.kernel.rsplit(":", 1)[-1] != "scaled_matmul_kernel":
            continue
        matmuls.append(b)
        assert all(mark in b.ptx for mark in marks), (marks, b.summary())
        if b.variant.arch == "sm_90" and b.variant.constants["BLOCK_M"] >= 64:
            assert b.uses_wgmma, b.summary()
        else:
            assert b.uses_mma, b.summary()
    assert matmuls
    return matmuls


_BAD = {  # argument -> (its bad value given the family, what the error must say)
    "xq-dtype": ("xq", lambda f: torch.zeros(3, 8, dtype=f.wrong_operands[0]), "xq must be {}"),
    "wq-dtype": ("wq", lambda f: torch.zeros(8, 5, dtype=f.wrong_operands[1]), "wq must be {}"),
    "K": ("wq", lambda f: torch.zeros(7, 5, dtype=f.operand), "disagree on K"),
    "wq-1d": ("wq", lambda f: torch.zeros(8, dtype=f.operand), "wq [K, N]"),
    "x_scale-shape": ("x_scale", lambda f: torch.ones(4), "x_scale must be [3] or []"),
    "x_scale-fp16": (
        "x_scale",
        lambda f: torch.ones(3, dtype=torch.float16),
        "x_scale must be float32",
    ),
    "w_scale-shape": ("w_scale", lambda f: torch.ones(6), "w_scale must be [5] or []"),
    "bias-shape": ("bias", lambda f: torch.ones(6), "bias must be a float [5]"),
    "out-int32": ("out_dtype", lambda f: torch.int32, "out_dtype must be"),
    "out-operand": ("out_dtype", lambda f: f.operand, "out_dtype must be"),
}


class ScaledMatmulTests:
    """The tests both families pass; a subclass named ``Test...`` sets `family`."""

    family: Family

    def test_package_imports_without_triton(self):
        code = (
            "import sys; sys.modules['triton'] = None\n"
            f"import kompakt.codegen.{self.family.package} as f\n"
            "f.choose_config(1, 64, 64); f.cost(1, 64, 64)\n"
            f"assert 'kompakt.codegen.{self.family.package}.kernel' not in sys.modules\n"
            "assert 'kompakt.codegen.scaled_matmul.kernel' not in sys.modules\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True)

    @pytest.mark.parametrize("m,n,k", [(1, 40, 72), (33, 40, 64), (20, 17, 100)])
    def test_accumulate_and_epilogue(self, m, n, k):
        """Quantized values over the whole range, fp32 out: only what the kernel rounds differs."""
        fam, gen = self.family, torch.Generator().manual_seed(m)
        xq, wq = fam.random_q((m, k), gen), fam.random_q((k, n), gen)
        x_scale, w_scale = torch.rand(m, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
        bias = torch.randn(n, generator=gen)
        y = fam.matmul(xq, x_scale, wq, w_scale, bias, torch.float32, config=SMALL)
        assert_epilogue_close(y, exact(xq, x_scale, wq, w_scale, bias), fam.epilogue_rtol)

    @pytest.mark.parametrize("x_dtype", DTYPES)
    @pytest.mark.parametrize("m", [1, 20, 70])  # one M per regime of choose_config
    @pytest.mark.parametrize("config", [None, SMALL], ids=["heuristic", "small-tiles"])
    def test_matmul_matches_reference(self, x_dtype, m, config):
        fam = self.family
        x, wq, w_scale, bias = operands(fam, m, 40, 72, x_dtype, seed=m)
        xq, x_scale = fam.quantize(x, True)
        y = fam.matmul(xq, x_scale, wq, w_scale, bias, config=config)
        assert y.dtype == torch.float16 and y.shape == (m, 40)
        assert_fp16_close(y, fam.reference(xq, x_scale, wq, w_scale, bias))
        assert_fp16_close(y, exact(xq, x_scale, wq, w_scale, bias).float())

    @pytest.mark.parametrize("per_row", [True, False], ids=["x-per-row", "x-per-tensor"])
    @pytest.mark.parametrize("per_channel", [True, False], ids=["w-per-channel", "w-per-tensor"])
    def test_scale_granularities_without_bias(self, per_row, per_channel):
        fam = self.family
        x = torch.randn(9, 40, generator=torch.Generator().manual_seed(3))
        w = torch.randn(40, 24, generator=torch.Generator().manual_seed(4))
        wq, w_scale = fam.quantize_weight(w, per_channel=per_channel)
        xq, x_scale = fam.quantize(x, per_row)
        y = fam.matmul(xq, x_scale, wq, w_scale, out_dtype=torch.float32, config=SMALL)
        assert_epilogue_close(y, exact(xq, x_scale, wq, w_scale, None), fam.epilogue_rtol)
        # and the quantized product stays close to the float one it stands for
        assert (y - x @ w).abs().max() < fam.quantization_error * (x @ w).abs().max()

    def test_batch_one_seq_one(self):
        fam = self.family
        x, wq, w_scale, bias = operands(fam, 1, 24, 40, torch.float16)
        xq, x_scale = fam.quantize(x.reshape(1, 1, 40), True)
        assert xq.shape == (1, 1, 40) and x_scale.shape == (1, 1)
        y = fam.matmul(xq, x_scale, wq, w_scale, bias)
        assert y.shape == (1, 1, 24)
        assert_fp16_close(y, fam.reference(xq, x_scale, wq, w_scale, bias))

    def test_empty_rows(self):
        fam = self.family
        xq, x_scale = fam.quantize(torch.zeros(0, 8), True)
        y = fam.matmul(xq, x_scale, torch.zeros(8, 4, dtype=fam.operand), torch.ones(4))
        assert y.shape == (0, 4)

    @pytest.mark.parametrize("case", list(_BAD))
    def test_bad_inputs_name_the_argument(self, case):
        fam = self.family
        good = {
            "xq": torch.zeros(3, 8, dtype=fam.operand),
            "x_scale": torch.ones(3),
            "wq": torch.zeros(8, 5, dtype=fam.operand),
            "w_scale": torch.ones(5),
        }
        name, bad, message = _BAD[case]
        with pytest.raises(CodegenError, match=re.escape(message.format(fam.operand))):
            fam.matmul(**{**good, name: bad(fam)})

    def test_choose_config_regimes(self):
        spec = self.family.spec
        small, mid, large = (spec.choose_config(m, 4096, 4096) for m in (1, 48, 4096))
        assert (small.block_m, mid.block_m, large.block_m) == (16, 64, 128)
        for cfg in (small, mid, large):
            assert cfg.block_k % 32 == 0  # int8 and fp8 MMA consume K in 32s
        # 100 KiB of shared memory: the large tile keeps fewer stages than on sm_90
        fewer = spec.choose_config(4096, 4096, 4096, self.family.small_smem_arch)
        assert fewer.num_stages < large.num_stages
        flops, moved = spec.cost(2, 3, 4)
        assert flops == 48 and moved == 8 + 12 + 20 + 12

    @pytest.mark.gpu
    @pytest.mark.parametrize("m", [1, 48, 512])
    def test_gpu_matches_reference_at_real_sizes(self, m):
        fam = self.family
        if torch.cuda.get_device_capability() < fam.min_capability:
            pytest.skip(f"{fam.package} needs sm_{''.join(map(str, fam.min_capability))}+")
        x, wq, w_scale, bias = (t.cuda() for t in operands(fam, m, 4096, 4096, torch.float16))
        for per_row in fam.gpu_granularities:
            xq, x_scale = fam.quantize(x, per_row)
            want_q, want_scale = fam.quantize_reference(x, per_row)
            assert torch.equal(xq.float(), want_q.float()) and torch.equal(x_scale, want_scale)
        y = fam.matmul(xq, x_scale, wq, w_scale, bias)
        want = exact(xq, x_scale, wq, w_scale, bias).float()
        torch.testing.assert_close(y.float().cpu(), want, rtol=2**-10, atol=1e-3)
