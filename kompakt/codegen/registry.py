"""Which kernel family runs which fused pattern: pattern name -> the family's ``bind`` function.

A binder takes a ``kompakt::FusedKernel`` node and a device and returns a kernel closure over the
node's inputs (prepacking weights once); it raises `CodegenError` when the node is outside what
the family supports, and the backend then runs the node's body through torch instead.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import onnx_ir as ir
import torch

Binder = Callable[[ir.Node, torch.device], Callable[..., object]]

# pattern -> "module:function"; imported lazily, so kompakt imports without triton.
BINDERS: dict[str, str] = {
    "dequant_matmul": "kompakt.codegen.dequant_matmul.bind:bind",
    "pointwise": "kompakt.codegen.pointwise.bind:bind",
    "norm": "kompakt.codegen.norm.bind:bind",
    "attention": "kompakt.codegen.attention.bind:bind",
    "scaled_matmul": "kompakt.codegen.scaled_matmul.bind:bind",
    "rotary": "kompakt.codegen.rotary.bind:bind",
    "glu": "kompakt.codegen.glu.bind:bind",
}


def binder_for(pattern: str) -> Binder | None:
    target = BINDERS.get(pattern)
    if target is None:
        return None
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)
