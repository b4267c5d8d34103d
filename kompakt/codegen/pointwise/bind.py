"""Binds a ``pointwise`` fused node to its generated kernel: the chain is read once, at plan time.

The fused node (see passes/fuse/fuse_elementwise.py) holds its elementwise ops in its body;
`chain_from_graph` turns that body into a `Chain`, and each call launches the kernel rendered for
it (rendered, hashed and loaded on the first launch per input dtype, then cached).

Everything the kernel could only discover at run time is checked here instead, so that a node
it cannot run raises `CodegenError` now and the backend runs its body through torch: inputs must
be float (or bool conditions), share one float dtype (scalars may differ), and have shapes known
well enough to prove each one's role.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.pointwise.chain import Chain, Step
from kompakt.codegen.pointwise.from_ir import chain_from_graph
from kompakt.errors import CodegenError
from kompakt.ir.fused import body_of

_FLOAT = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def bind(node: ir.Node, device: torch.device) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A kernel closure: the fused node's inputs in, its outputs (a tuple, in order) out."""
    # kernel.py is the one module importing triton: imported here, at bind time, not at import.
    from kompakt.codegen.pointwise.kernel import _condition_only, launch_chain

    body = body_of(node)
    chain = chain_from_graph(body)  # raises CodegenError naming an op or broadcast it cannot do
    chain = _constant_exponents(chain, node)
    _check_inputs(node, body, chain, _condition_only(chain))
    if len(chain.outputs) != len(node.outputs):
        raise CodegenError(
            f"fused node '{node.name}' has {len(node.outputs)} outputs, its body "
            f"{len(chain.outputs)}"
        )

    def kernel(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(launch_chain(chain, *inputs))

    return kernel


def _check_inputs(node: ir.Node, body: ir.Graph, chain: Chain, conditions: set[int]) -> None:
    if len(node.inputs) != len(chain.inputs):
        raise CodegenError(
            f"fused node '{node.name}' has {len(node.inputs)} inputs, its body {len(chain.inputs)}"
        )
    first: ir.Value | None = None
    for i, (value, operand) in enumerate(zip(node.inputs, chain.inputs, strict=True)):
        what = f"fused node '{node.name}' input {i} ('{value.name if value else None}')"
        if value is None or value.dtype is None:
            raise CodegenError(f"{what}: the dtype is unknown")
        if value.dtype == ir.DataType.BOOL and i in conditions:
            continue
        if value.dtype not in _FLOAT:
            raise CodegenError(
                f"{what} is {value.dtype.name}; the pointwise kernel reads fp32, fp16 or bf16"
                " (bool only as a Where condition)"
            )
        if first is None:
            first = value
        elif operand.role != "scalar" and value.dtype != first.dtype:
            raise CodegenError(
                f"{what} is {value.dtype.name} but input '{first.name}' is {first.dtype.name}: "
                "one launch reads one dtype"
            )
    for value in (*body.inputs, *body.outputs):
        if value.shape is None or any(_unknown(d) for d in value.shape):
            raise CodegenError(
                f"fused node '{node.name}': value '{value.name}' has an unknown shape, so its "
                "broadcast cannot be checked before the kernel runs"
            )


def _constant_exponents(chain: Chain, node: ir.Node) -> Chain:
    """Pow steps whose exponent is a one-element initializer get it as a constant attr.

    Fusion makes every outside value a body input, constants too, so the body alone cannot tell
    ``Pow(x, 2.0)`` from a run-time exponent; the node's inputs can. A constant exponent renders
    as ``x * x`` (variances) or ``x * x * x`` (tanh-GELU) instead of exp2(y * log2|x|).
    """
    constants = {}
    for i, value in enumerate(node.inputs):
        tensor = value.const_value if value is not None else None
        if tensor is not None and tensor.size == 1 and value.dtype in _FLOAT:
            number = float(tensor.numpy().reshape(-1)[0])
            if math.isfinite(number):
                constants[i] = number
    steps = tuple(
        Step("Pow", s.args[:1], {"exponent": constants[s.args[1]]})
        if s.op == "Pow" and len(s.args) == 2 and s.args[1] in constants
        else s
        for s in chain.steps
    )
    if steps == chain.steps:
        return chain
    return Chain(inputs=chain.inputs, steps=steps, outputs=chain.outputs)


def _unknown(dim) -> bool:
    return not isinstance(dim, int) and dim.value is None
