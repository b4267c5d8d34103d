"""The semantics of a `Chain` in plain torch ops, computed in fp32 (what kernels are tested
against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kompakt.codegen.pointwise.chain import Chain, Step

_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE = {v: k for k, v in _TORCH.items()}


def evaluate(chain: Chain, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``chain`` on ``tensors`` (as `launch_chain` takes them); outputs in their storage dtypes.

    Row inputs are flattened to ``[D]`` and scalars to ``[]`` so torch broadcasting does the
    rest; everything is upcast to fp32 first.
    """
    first = next(i for i, o in enumerate(chain.inputs) if o.role == "full")
    shape = tensors[first].shape
    values: list[torch.Tensor] = []
    for operand, t in zip(chain.inputs, tensors, strict=True):
        t = t.to(torch.float32)
        values.append(
            t.reshape(-1)
            if operand.role == "row"
            else t.reshape(())
            if (operand.role == "scalar")
            else t
        )
    for step in chain.steps:
        values.append(_apply(step, [values[a] for a in step.args]))
    typed = [t.dtype for t in tensors if t.dtype != torch.bool]
    dtypes = chain.out_dtypes(_DTYPE[typed[0]] if typed else "fp32")
    return [
        values[o].expand(shape).to(_TORCH[d]).contiguous()
        for o, d in zip(chain.outputs, dtypes, strict=True)
    ]


def _apply(step: Step, a: list[torch.Tensor]) -> torch.Tensor:
    op = step.op
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
    unary = {
        "Neg": torch.neg,
        "Abs": torch.abs,
        "Exp": torch.exp,
        "Log": torch.log,
        "Sqrt": torch.sqrt,
        "Reciprocal": torch.reciprocal,
        "Tanh": torch.tanh,
        "Sigmoid": torch.sigmoid,
        "Relu": torch.relu,
        "Erf": torch.erf,
    }
    if op in binary:
        return binary[op](a[0], a[1])
    if op in unary:
        return unary[op](a[0])
    if op == "Gelu":
        return F.gelu(a[0], approximate=str(step.attr("approximate", "none")))
    if op == "Pow":
        return torch.pow(a[0], a[1] if len(a) == 2 else float(step.attr("exponent")))
    if op in ("Min", "Max"):
        fn = torch.minimum if op == "Min" else torch.maximum
        result = a[0]
        for other in a[1:]:
            result = fn(result, other)
        return result
    if op == "Where":
        return torch.where(a[0] != 0, a[1], a[2])
    if op == "Cast":
        return a[0].to(_TORCH[str(step.attr("to"))]).to(torch.float32)
    if op == "Clip":
        low, high = step.attr("min"), step.attr("max")
        return a[0] if low is None and high is None else torch.clamp(a[0], min=low, max=high)
    if op == "Constant":
        return torch.tensor(float(step.attr("value")), dtype=torch.float32)
    raise NotImplementedError(op)
