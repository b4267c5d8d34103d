"""Torch reference of the dequant-matmul family: what every kernel variant must compute.

    y = epilogue(x @ W)      W = (q - zeros) * scales   (from a `PackedWeight`)
    epilogue: + bias[N], then activation (none, relu, silu, gelu, gelu_tanh), then + residual[M, N]

Accumulation is fp32; the result is cast to x's dtype at the end, as the kernels do.
"""

from __future__ import annotations

import torch

from kompakt.codegen.dequant_matmul.layout import PackedWeight, unpack

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")


def activation(y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "none":
        return y
    if kind == "relu":
        return torch.relu(y)
    if kind == "silu":
        return y * torch.sigmoid(y)
    if kind == "gelu":
        return torch.nn.functional.gelu(y)
    if kind == "gelu_tanh":
        return torch.nn.functional.gelu(y, approximate="tanh")
    raise ValueError(f"unknown activation '{kind}'; known: {', '.join(ACTIVATIONS)}")


def dequant_matmul_reference(
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    act: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``epilogue(x @ unpack(weight))`` for x [..., K]; returns [..., N] in x's dtype."""
    w = unpack(weight).to(x.device)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    y = activation(y, act)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)
