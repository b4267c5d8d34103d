"""Launchers of the int8 (W8A8) matmul family.

The Triton kernels are shared with the fp8 family (`kompakt.codegen.scaled_matmul.kernel`): they
read the operand type from the pointers, so int8 operands compile to an int32-accumulating
tensor-core GEMM and an int8 ``xq`` to round-half-even onto +-127. These launchers fix the dtype
and the arch gate and call `scaled_matmul.launch`, which checks the inputs and launches.
"""

from __future__ import annotations

import torch

from kompakt.codegen.int8_matmul.spec import Config, choose_config
from kompakt.codegen.scaled_matmul.launch import launch_scaled_matmul, quantize_rows


def launch_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token quantization: x [..., K] float -> (xq int8 [..., K], scale fp32
    [...]) with scale = max|row| / 127 (1 for an all-zero row), xq = round_half_even(x / scale)."""
    return quantize_rows(x, torch.int8, per_row=True)


def launch_int8_matmul(
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
    """y [..., N] = (xq [..., K] @ wq [K, N], in int32) * x_scale * w_scale (+ bias), as out_dtype.

    x_scale is fp32 [...] (per token) or [] (per tensor); w_scale fp32 [N] (per output channel)
    or [] (per tensor); bias [N] of any float dtype. ``config`` overrides the heuristic tiling;
    ``arch`` (default: the device's, sm_90 on CPU) picks it.
    """
    return launch_scaled_matmul(
        xq, x_scale, wq, w_scale, bias, out_dtype,
        operand=torch.int8, choose_config=choose_config, config=config, arch=arch,
    )  # fmt: skip
