"""Torch reference shared by the int8 and fp8 matmul families: absmax scales and the scaled GEMM.

Both families quantize symmetrically: a scale maps the largest magnitude of a row, a column or the
whole tensor onto the format's largest value ``qmax`` (127 for int8, 448 for e4m3), and an
all-zero slice gets scale 1 so dividing by it is safe. The matmul dequantizes both operands and
multiplies in fp32; the kernels instead sum exact products (int32, or fp32 for fp8) and scale
once, which agrees to fp32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def absmax_scale(xf: torch.Tensor, qmax: float, dim: int | None = None) -> torch.Tensor:
    """fp32 ``max|xf| / qmax`` over ``dim`` (the whole tensor when None); 1 where the max is 0.

    An empty reduction (K = 0) has max 0: ``sum`` gives those zeros where ``amax`` would raise.
    """
    a = xf.abs()
    if dim is None:
        amax = a.amax() if a.numel() else a.sum()
    else:
        amax = a.amax(dim=dim) if a.shape[dim] else a.sum(dim=dim)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def absmax_quantize(
    t: torch.Tensor, qmax: float, dim: int | None, cast: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``cast(t / scale)``, scale) with scale = `absmax_scale` of t over ``dim``; ``cast`` rounds
    and clamps onto the format (int8 or e4m3)."""
    tf = t.float()
    scale = absmax_scale(tf, qmax, dim)
    return cast(tf / (scale if dim is None else scale.unsqueeze(dim))), scale


def scaled_matmul_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``(xq * x_scale) @ (wq * w_scale) + bias`` in fp32, cast to out_dtype; y [..., N].

    xq [..., K] and wq [K, N] are int8 or float8_e4m3fn; x_scale is fp32 [...] (per row) or []
    (per tensor), w_scale fp32 [N] (per output channel) or [], bias [N] of any float dtype.
    """
    xs = x_scale.float()
    x = xq.float() * (xs.unsqueeze(-1) if xs.dim() else xs)
    w = wq.float() * w_scale.float()  # [N] broadcasts over the columns of [K, N]
    y = x @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
