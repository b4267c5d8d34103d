"""Torch reference of the dequant-matmul family: what every kernel variant must compute.

    y = epilogue(x @ W)      W = (q - zeros) * scales   (from a `PackedWeight`)
    epilogue: + bias[N], then activation (none, relu, silu, gelu, gelu_tanh), then + residual[M, N]

A gated activation (``glu_silu``, ``glu_gelu``, ``glu_gelu_tanh``) takes the gate/up projection
of a gated MLP in one GEMM: W's columns alternate gate and up (`interleave_halves` puts a merged
[gate | up] weight in that order), and y = act(y[..., 0::2]) * y[..., 1::2], [..., N / 2].

Accumulation is fp32; the result is cast to x's dtype at the end, as the kernels do.
"""

from __future__ import annotations

import torch

from kompakt.codegen.dequant_matmul.layout import PackedWeight, unpack

ACTIVATIONS = ("none", "relu", "silu", "gelu", "gelu_tanh")
GLU_ACTIVATIONS = ("glu_silu", "glu_gelu", "glu_gelu_tanh")


def gated(act: str) -> tuple[bool, str]:
    """(whether ``act`` is a gated activation, the activation applied to the gate)."""
    if act in GLU_ACTIVATIONS:
        return True, act.removeprefix("glu_")
    if act in ACTIVATIONS:
        return False, act
    known = ", ".join(ACTIVATIONS + GLU_ACTIVATIONS)
    raise ValueError(f"unknown activation '{act}'; known: {known}")


def interleave_halves(t: torch.Tensor) -> torch.Tensor:
    """[..., 2F] as [gate | up] -> [..., 2F] with gate and up columns alternating."""
    half = t.shape[-1] // 2
    if t.shape[-1] != 2 * half:
        raise ValueError(f"a gated projection needs an even number of columns, got {t.shape[-1]}")
    return torch.stack((t[..., :half], t[..., half:]), dim=-1).reshape(t.shape)


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
    """``epilogue(x @ unpack(weight))`` for x [..., K]; returns [..., N] in x's dtype ([..., N/2]
    for a gated activation)."""
    glu, base = gated(act)
    w = unpack(weight).to(x.device)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    y = activation(y[..., 0::2], base) * y[..., 1::2] if glu else activation(y, base)
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)
