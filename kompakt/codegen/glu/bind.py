"""Binds a ``glu`` fused node (see passes/fuse/fuse_glu.py) to the glu family's kernel.

The node's ``roles`` name its two inputs ``gate`` and ``up`` (one tensor may be both), its
``kind`` attribute the activation. What the kernel cannot take is rejected here, at plan time, so
the backend runs the body through torch instead of failing at the first call.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.binding import input_roles
from kompakt.codegen.glu.spec import KINDS
from kompakt.errors import CodegenError

_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def bind(node: ir.Node, device: torch.device) -> Callable[..., torch.Tensor]:
    """A kernel closure taking the fused node's inputs; returns its one output."""
    from kompakt.codegen.glu.kernel import launch_glu

    where = f"glu node '{node.name}'"
    index = input_roles(node, {"gate", "up"}, where)
    if set(index) != {"gate", "up"}:
        raise CodegenError(f"{where}: needs inputs with the roles 'gate' and 'up'")
    attr = node.attributes.get("kind")
    kind = attr.as_string() if attr is not None and attr.type == ir.AttributeType.STRING else None
    if kind not in KINDS:
        raise CodegenError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for role in ("gate", "up"):
        value = node.inputs[index[role]]
        if value.dtype not in _DTYPES:
            name = value.dtype.name if value.dtype is not None else "unknown"
            raise CodegenError(f"{where}: {role} '{value.name}' is {name}; the kernel takes floats")
    if len(node.outputs) != 1:
        raise CodegenError(f"{where}: has {len(node.outputs)} outputs; the kernel writes one")
    gate_at, up_at = index["gate"], index["up"]

    def kernel(*inputs: torch.Tensor) -> torch.Tensor:
        return launch_glu(inputs[gate_at], inputs[up_at], kind)

    return kernel
