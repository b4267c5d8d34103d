"""Normalization layers: LayerNormalization, RMSNormalization, GroupNormalization,
InstanceNormalization, BatchNormalization, MeanVarianceNormalization, LpNormalization.

Following the ONNX function bodies, the statistics are computed in ``stash_type`` precision
(float32 by default) and the normalized value is cast back to the input's dtype *before* scale
and bias are applied. Variances are biased (divided by N), as in the ONNX definitions.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

from kompakt.ir.tensors import ONNX_TO_TORCH
from kompakt.runtime.reference._common import norm_axis, op
from kompakt.runtime.reference.registry import Kernel, NodeInfo


def _stash_dtype(node: NodeInfo) -> torch.dtype:
    stash = node.attr("stash_type", 1)
    try:
        return ONNX_TO_TORCH[ir.DataType(stash)]
    except (KeyError, ValueError):
        raise node.unsupported(f"stash_type {stash}") from None


def _moments(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    return mean, var


@op("LayerNormalization")
def layer_normalization(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", -1)
    epsilon = node.attr("epsilon", 1e-5)
    stash = _stash_dtype(node)
    mean_dtype = node.output_dtype(1) if node.num_outputs > 1 else None
    inv_dtype = node.output_dtype(2) if node.num_outputs > 2 else None

    def kernel(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        dims = tuple(range(norm_axis(axis, x.dim()), x.dim()))
        xs = x.to(stash)
        mean, var = _moments(xs, dims)
        inv_std = torch.rsqrt(var + epsilon)
        y = ((xs - mean) * inv_std).to(x.dtype) * scale
        if bias is not None:
            y = y + bias
        return y, mean.to(mean_dtype or stash), inv_std.to(inv_dtype or stash)

    return kernel


@op("RMSNormalization")
def rms_normalization(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", -1)
    epsilon = node.attr("epsilon", 1e-5)
    stash = _stash_dtype(node)

    def kernel(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(norm_axis(axis, x.dim()), x.dim()))
        xs = x.to(stash)
        rms = torch.sqrt(xs.square().mean(dims, keepdim=True) + epsilon)
        return (xs / rms).to(x.dtype) * scale

    return kernel


@op("GroupNormalization")
def group_normalization(node: NodeInfo) -> Kernel:
    if node.opset < 21:  # opset 18 took scale/bias per group, a definition ONNX withdrew
        raise node.unsupported("opset 18 GroupNormalization (per-group scale) is deprecated")
    groups = node.attr("num_groups")
    epsilon = node.attr("epsilon", 1e-5)
    stash = _stash_dtype(node)

    def kernel(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        grouped = x.to(stash).reshape(n, groups, -1)
        mean, var = _moments(grouped, (2,))
        normalized = ((grouped - mean) * torch.rsqrt(var + epsilon)).reshape(x.shape).to(x.dtype)
        per_channel = (c,) + (1,) * (x.dim() - 2)
        return normalized * scale.reshape(per_channel) + bias.reshape(per_channel)

    return kernel


@op("InstanceNormalization")
def instance_normalization(node: NodeInfo) -> Kernel:
    epsilon = node.attr("epsilon", 1e-5)

    def kernel(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        mean, var = _moments(x, tuple(range(2, x.dim())))
        per_channel = (x.shape[1],) + (1,) * (x.dim() - 2)
        return (x - mean) * torch.rsqrt(var + epsilon) * scale.reshape(per_channel) + bias.reshape(
            per_channel
        )

    return kernel


@op("BatchNormalization")
def batch_normalization(node: NodeInfo) -> Kernel:
    if node.opset < 9:  # the older forms have is_test/spatial attributes
        raise node.unsupported(f"opset {node.opset} BatchNormalization")
    epsilon = node.attr("epsilon", 1e-5)
    momentum = node.attr("momentum", 0.9)
    training = bool(node.attr("training_mode", 0)) if node.opset >= 14 else node.num_outputs > 1

    if node.opset < 14 and training:
        raise node.unsupported("training outputs before opset 14")

    def kernel(x, scale, bias, mean, var):
        per_channel = (x.shape[1],) + (1,) * (x.dim() - 2)
        if training:  # statistics of this batch; running statistics updated by momentum
            dims = (0, *range(2, x.dim()))
            batch_mean, batch_var = (m.reshape(-1) for m in _moments(x, dims))
            y = (x - batch_mean.reshape(per_channel)) * torch.rsqrt(
                batch_var.reshape(per_channel) + epsilon
            )
            y = y * scale.reshape(per_channel) + bias.reshape(per_channel)
            running_mean = mean * momentum + batch_mean * (1 - momentum)
            running_var = var * momentum + batch_var * (1 - momentum)
            return y, running_mean.to(mean.dtype), running_var.to(var.dtype)
        inv_std = torch.rsqrt(var.reshape(per_channel) + epsilon)
        y = (x - mean.reshape(per_channel)) * inv_std
        return y * scale.reshape(per_channel) + bias.reshape(per_channel)

    return kernel


@op("MeanVarianceNormalization")
def mean_variance_normalization(node: NodeInfo) -> Kernel:
    axes = node.attr("axes", [0, 2, 3])

    def kernel(x: torch.Tensor) -> torch.Tensor:
        mean, var = _moments(x, tuple(norm_axis(a, x.dim()) for a in axes))
        return (x - mean) / (torch.sqrt(var) + 1e-9)  # the function body's epsilon

    return kernel


@op("LpNormalization")
def lp_normalization(node: NodeInfo) -> Kernel:
    axis = node.attr("axis", -1)
    p = node.attr("p", 2)
    if p not in (1, 2):
        raise node.unsupported(f"p={p}")

    def kernel(x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, ord=p, dim=norm_axis(axis, x.dim()), keepdim=True)
        # A zero norm gives zeros, not NaN (opset 22).
        return torch.where(norm == 0, torch.zeros_like(x), x / norm)

    return kernel
