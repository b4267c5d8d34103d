"""Pointwise activation functions.

Formulas follow the ONNX definitions (function bodies), written so they stay finite for large
inputs: softplus is computed as ``relu(x) + log1p(exp(-|x|))`` instead of ``log(1 + exp(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kompakt.runtime.reference._common import op
from kompakt.runtime.reference.registry import Kernel, NodeInfo

# Defaults of Selu, the constants of the self-normalizing network paper in float32.
_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) + torch.log1p(torch.exp(-torch.abs(x)))


@op("Relu")
def relu(node: NodeInfo) -> Kernel:
    return torch.relu


@op("Sigmoid")
def sigmoid(node: NodeInfo) -> Kernel:
    return torch.sigmoid


@op("Tanh")
def tanh(node: NodeInfo) -> Kernel:
    return torch.tanh


@op("Gelu")
def gelu(node: NodeInfo) -> Kernel:
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.unsupported(f"approximate='{approximate}'")
    return lambda x: F.gelu(x, approximate=approximate)


@op("Softplus")
def softplus(node: NodeInfo) -> Kernel:
    return _softplus


@op("Softsign")
def softsign(node: NodeInfo) -> Kernel:
    return lambda x: x / (1 + torch.abs(x))


@op("Mish")
def mish(node: NodeInfo) -> Kernel:
    return lambda x: x * torch.tanh(_softplus(x))


@op("Swish")
def swish(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    return lambda x: x * torch.sigmoid(alpha * x)


@op("LeakyRelu")
def leaky_relu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 0.01)
    return lambda x: torch.where(x < 0, x * alpha, x)


@op("PRelu")
def prelu(node: NodeInfo) -> Kernel:
    # The slope broadcasts unidirectionally to x, which plain broadcasting covers.
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@op("ThresholdedRelu")
def thresholded_relu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@op("Elu")
def elu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x < 0, alpha * torch.expm1(x), x)


@op("Celu")
def celu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    return lambda x: torch.where(x < 0, alpha * torch.expm1(x / alpha), x)


@op("Selu")
def selu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", _SELU_ALPHA)
    gamma = node.attr("gamma", _SELU_GAMMA)
    return lambda x: gamma * torch.where(x <= 0, alpha * torch.expm1(x), x)


@op("HardSigmoid")
def hard_sigmoid(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 0.2)
    beta = node.attr("beta", 0.5)
    return lambda x: torch.clamp(alpha * x + beta, 0, 1)


@op("HardSwish")
def hard_swish(node: NodeInfo) -> Kernel:
    return lambda x: x * torch.clamp(x / 6 + 0.5, 0, 1)


@op("Shrink")
def shrink(node: NodeInfo) -> Kernel:
    bias = node.attr("bias", 0.0)
    lambd = node.attr("lambd", 0.5)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x)
        return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)

    return kernel


@op("SwiGLU")
def swiglu(node: NodeInfo) -> Kernel:
    alpha = node.attr("alpha", 1.0)
    return lambda a, b: a * torch.sigmoid(alpha * a) * b
