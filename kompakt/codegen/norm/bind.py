"""Binds a ``norm`` fused node (see passes/fuse/fuse_norm.py) to the norm family's kernel.

The node's ``roles`` name each input (``x``, ``residual``, ``weight``, ``bias``; the scalar
constants of the RMSNorm body, ``exponent``, ``axes``, ``eps``, ``one``, are already read into the
``eps`` attribute), ``kind`` picks RMSNorm or LayerNorm, and ``output_roles`` says which output is
the normalized tensor (``out``) and which the residual sum (``summed``). Everything the kernel
cannot take is rejected here, at plan time, so the backend can run the body through torch instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.binding import input_roles
from kompakt.errors import CodegenError

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_KNOWN_ROLES = {"x", "residual", "weight", "bias", "exponent", "axes", "eps", "one"}


def bind(node: ir.Node, device: torch.device) -> Callable[..., object]:
    """A kernel closure taking the fused node's inputs; returns its outputs (a tuple when two)."""
    from kompakt.codegen.norm.kernel import launch_layer_norm, launch_rms_norm

    where = f"norm node '{node.name}'"
    kind = _string(node, "kind")
    if kind not in ("rms", "layer"):
        raise CodegenError(f"{where}: kind '{kind}' is neither 'rms' nor 'layer'")
    eps_attr = node.attributes.get("eps")
    eps = eps_attr.as_float() if eps_attr is not None else math.nan
    if not eps >= 0.0:  # also NaN: a missing attribute
        raise CodegenError(f"{where}: eps must be a float >= 0, got {eps_attr}")
    index = input_roles(node, _KNOWN_ROLES, where)
    for required in ("x", "weight"):
        if required not in index:
            raise CodegenError(f"{where}: no input has the role '{required}'")
    if kind == "rms" and "bias" in index:
        raise CodegenError(f"{where}: an RMSNorm takes no bias")
    x = node.inputs[index["x"]]
    if x.dtype not in _DTYPES:
        raise CodegenError(
            f"{where}: x '{x.name}' is {_name(x.dtype)}; the kernel takes fp16/bf16/fp32"
        )
    d = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
    for role in ("weight", "bias"):
        if role in index:
            param = node.inputs[index[role]]
            if param.dtype not in _DTYPES or param.shape is None or list(param.shape) != [d]:
                raise CodegenError(
                    f"{where}: {role} '{param.name}' must be a float [{d}], got "
                    f"{_name(param.dtype)}{list(param.shape) if param.shape is not None else '[?]'}"
                )
    residual_at = index.get("residual")
    if residual_at is not None:
        residual = node.inputs[residual_at]
        if residual.dtype != x.dtype or residual.shape is None or x.shape is None:
            raise CodegenError(f"{where}: residual '{residual.name}' does not match x '{x.name}'")
        if list(residual.shape) != list(x.shape):
            raise CodegenError(
                f"{where}: residual shape {list(residual.shape)} differs from x {list(x.shape)}"
            )
    outputs = _strings(node, "output_roles") or ["out"] * len(node.outputs)
    expected = ["out"] if residual_at is None else ["out", "summed"]
    if len(outputs) != len(node.outputs) or sorted(outputs) not in (["out"], sorted(expected)):
        raise CodegenError(
            f"{where}: outputs {outputs} do not fit a norm with residual={residual_at is not None}"
        )
    for value in node.outputs:
        if value.dtype is not None and value.dtype != x.dtype:
            raise CodegenError(
                f"{where}: output '{value.name}' is {_name(value.dtype)}, but the kernel writes "
                f"x's dtype {_name(x.dtype)}"
            )

    x_at, weight_at, bias_at = index["x"], index["weight"], index.get("bias")

    def kernel(*inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        residual = None if residual_at is None else inputs[residual_at]
        if kind == "rms":
            result = launch_rms_norm(inputs[x_at], inputs[weight_at], eps, residual)
        else:
            bias = None if bias_at is None else inputs[bias_at]
            result = launch_layer_norm(inputs[x_at], inputs[weight_at], bias, eps, residual)
        if residual is None:
            return result
        out, summed = result
        if len(outputs) == 1:  # the sum is read by nothing else
            return out
        return tuple(summed if role == "summed" else out for role in outputs)

    return kernel


def _string(node: ir.Node, name: str) -> str | None:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else None


def _strings(node: ir.Node, name: str) -> list[str] | None:
    attr = node.attributes.get(name)
    return list(attr.as_strings()) if attr is not None else None


def _name(dtype: ir.DataType | None) -> str:
    return dtype.name if dtype is not None else "of unknown dtype"
