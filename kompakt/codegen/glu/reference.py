"""Torch reference of the glu family: gated linear units, the MLP core of Llama (SwiGLU) and
Gemma / T5 v1.1 (GeGLU).

    out = act(gate) * up          act: silu (SwiGLU), gelu (erf), gelu_tanh (tanh approximation)

gate and up are [..., F]; packed, x [..., 2F] holds gate in x[..., :F] and up in x[..., F:] (a
merged gate/up projection's output). The math is fp32; out has the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as fn

KINDS = ("silu", "gelu", "gelu_tanh")


def activation(gate: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "silu":
        return fn.silu(gate)
    if kind == "gelu":
        return fn.gelu(gate)
    if kind == "gelu_tanh":
        return fn.gelu(gate, approximate="tanh")
    raise ValueError(f"unknown GLU kind '{kind}'; known: {', '.join(KINDS)}")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, kind: str) -> torch.Tensor:
    """``act(gate) * up`` in fp32, cast to gate's dtype."""
    return (activation(gate.float(), kind) * up.float()).to(gate.dtype)


def glu_packed_reference(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`glu_reference` of x's halves: gate = x[..., :F], up = x[..., F:]."""
    gate, up = x.chunk(2, dim=-1)
    return glu_reference(gate, up, kind)
