"""Launchers of the fp8 (e4m3) matmul family.

The Triton kernels are shared with the int8 family (`kompakt.codegen.scaled_matmul.kernel`): they
read the operand type from the pointers, so e4m3 operands compile to an fp32-accumulating fp8
tensor-core GEMM and an e4m3 ``xq`` to round-half-even onto the e4m3 grid (+-448). These
launchers fix the dtype and the sm_89+ gate and call `scaled_matmul.launch`, which checks the
inputs and launches.
"""

from __future__ import annotations

import torch

from kompakt.codegen.fp8_matmul.spec import Config, choose_config, require_fp8
from kompakt.codegen.scaled_matmul.launch import device_arch, launch_scaled_matmul, quantize_rows

_FP8 = torch.float8_e4m3fn


def launch_quantize_fp8(
    x: torch.Tensor, per_row: bool, *, arch: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (xq float8_e4m3fn [..., K], scale fp32 [...] if per_row else []),
    scale = amax / 448 (1 when amax is 0), xq = round_half_even(clamp(x / scale, +-448))."""
    require_fp8(arch or device_arch(x))
    return quantize_rows(x, _FP8, per_row)


def launch_fp8_matmul(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    *,
    config: Config | None = None,
    arch: str | None = None,
) -> torch.Tensor:
    """y [..., N] = (xq [..., K] @ wq [K, N], fp32 accumulate) * x_scale * w_scale (+ bias).

    xq and wq are float8_e4m3fn; x_scale fp32 [...] (per row) or [] (per tensor); w_scale fp32
    [N] (per output channel) or []; bias [N] of any float dtype. ``arch`` (default: the device's,
    sm_90 on CPU) picks the tiling; below sm_89 this raises CodegenError.
    """
    arch = arch or device_arch(xq)
    require_fp8(arch)
    return launch_scaled_matmul(
        xq, x_scale, wq, w_scale, bias, out_dtype,
        operand=_FP8, choose_config=choose_config, config=config, arch=arch,
    )  # fmt: skip
