"""Binds a ``dequant_matmul`` fused node to the Triton kernel: packs its weight once, at plan time.

The fused node (see passes/fuse/fuse_dequant_matmul.py) names each input's role (``q``, ``scale``,
``zero``, ``x``, ``bias``, ``residual``) and its epilogue (``act``); the DequantizeLinear in its
body gives the grouping (``axis``, ``block_size``). Each call's kernel is what the device's
autotune cache measured fastest for its shape bucket (`tuning.py`), else the heuristic; decided
once per number of rows.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.autotune import AutotuneCache
from kompakt.codegen.binding import input_roles
from kompakt.codegen.dequant_matmul.layout import pack
from kompakt.codegen.dequant_matmul.reference import GLU_ACTIVATIONS, interleave_halves
from kompakt.codegen.dequant_matmul.spec import choose_config
from kompakt.codegen.dequant_matmul.tuning import cache_key, heuristic, launch_choice
from kompakt.codegen.devices import autotune_device, tuning_arch
from kompakt.ir.fused import body_of
from kompakt.ir.tensors import to_torch, torch_dtype

_ROLES = (
    "q",
    "scale",
    "zero",
    "x",
    "bias",
    "residual",
    "split_sizes",
)  # sizes: checked by the pass
_BITS = {ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8}


def bind(node: ir.Node, device: torch.device) -> Callable[..., torch.Tensor]:
    """A kernel closure taking the fused node's inputs (weights are ignored: packed already)."""
    index = input_roles(node, _ROLES, f"dequant-matmul node '{node.name}'")
    q_value, scale_value = node.inputs[index["q"]], node.inputs[index["scale"]]
    zero_value = node.inputs[index["zero"]] if "zero" in index else None
    x_value = node.inputs[index["x"]]
    dq = next(n for n in body_of(node) if n.op_type == "DequantizeLinear")
    block = dq.attributes.get("block_size")
    q = to_torch(q_value.const_value)
    k = q.shape[0]
    group = block.value if block is not None and block.value else k
    scale = to_torch(scale_value.const_value)
    if scale.numel() == 1:  # per tensor: one scale for every column
        scale = scale.reshape(1).expand(q.shape[1]).contiguous()
    zero = None if zero_value is None else to_torch(zero_value.const_value)
    if zero is not None and zero.numel() == 1:
        zero = zero.reshape(1).expand(q.shape[1]).contiguous()
    dtype = torch_dtype(x_value.dtype) if x_value.dtype is not None else torch.float32
    bits = _BITS[q_value.dtype]
    if group < k:
        choose_config(1, q.shape[1], k, group, bits)  # raises for groups the kernels cannot tile
    act = node.attributes["act"].as_string()
    glu = act in GLU_ACTIVATIONS
    # a gated activation reads [gate | up] with their columns interleaved: each output tile
    # then holds both halves of its columns (reference.interleave_halves)
    order = interleave_halves if glu else (lambda t: t)
    packed = pack(order(q), order(scale), None if zero is None else order(zero), bits, group, dtype)
    packed = packed.to(device)
    bias = None
    if "bias" in index:
        bias = order(to_torch(node.inputs[index["bias"]].const_value)).to(device)
    x_at, residual_at = index["x"], index.get("residual")
    tuned = AutotuneCache.for_device(autotune_device(device))
    arch = tuning_arch(device)
    choices: dict[int, dict] = {}  # rows -> kernel choice, decided once per M

    def kernel(*inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[x_at]
        residual = None if residual_at is None else inputs[residual_at]
        m = x.numel() // max(1, x.shape[-1])
        choice = choices.get(m)
        if choice is None:
            choice = tuned.get(cache_key(m, packed)) or heuristic(m, packed, arch)
            if choice["family"] != "triton" and (act != "none" or residual is not None):
                choice = heuristic(m, packed, arch)  # the CUDA C GEMV has no such epilogue
            choices[m] = choice
        return launch_choice(choice, x, packed, bias, act, residual)

    # the backend may free these constants: the packed copy above is what the kernel reads
    kernel.unread_inputs = tuple(index[r] for r in ("q", "scale", "zero", "bias") if r in index)
    return kernel
