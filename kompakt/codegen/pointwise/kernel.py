"""Launching a generated pointwise kernel on tensors (the only module here that needs triton)."""

from __future__ import annotations

import functools

import torch
import triton

from kompakt.codegen.pointwise.cache import load_kernel
from kompakt.codegen.pointwise.chain import Chain
from kompakt.codegen.pointwise.render import render
from kompakt.codegen.pointwise.spec import Config, choose_config
from kompakt.errors import CodegenError

_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_TORCH = {name: dtype for dtype, name in _DTYPE.items()}


def launch_chain(chain: Chain, *tensors: torch.Tensor, config: Config | None = None):
    """Runs ``chain`` on ``tensors`` (one per ``chain.inputs``) in one kernel.

    'full' inputs all have the output's shape; a 'row' input has shape ``[D]`` (or
    ``[1, ..., 1, D]``) for the output's last dim D; a 'scalar' input has one element. Inputs
    share one float dtype, except that an input used only as a `Where` condition may be bool
    and a 'scalar' input may be any float dtype.

    Returns:
        One new contiguous tensor per ``chain.outputs``, dtypes from ``chain.out_dtypes``.
    """
    if len(tensors) != len(chain.inputs):
        raise CodegenError(f"chain takes {len(chain.inputs)} inputs, got {len(tensors)}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise CodegenError(f"input {i} is a {type(t).__name__}, not a torch.Tensor")
    first = next(i for i, o in enumerate(chain.inputs) if o.role == "full")
    shape, device = tuple(tensors[first].shape), tensors[first].device
    d = shape[-1] if shape else 1
    conditions = _condition_only(chain)
    # The first input that is not only a Where condition sets the dtype of all the others.
    typed = next((i for i in range(len(tensors)) if i not in conditions), None)
    dtype = torch.float32 if typed is None else tensors[typed].dtype
    if dtype not in _DTYPE:
        raise CodegenError(f"input {typed} has dtype {dtype}; supported: fp32, fp16, bf16")
    dtype_in = _DTYPE[dtype]
    for i, (operand, t) in enumerate(zip(chain.inputs, tensors, strict=True)):
        what = f"input {i} ('{operand.role}')"
        if t.device != device:
            raise CodegenError(f"{what} is on {t.device}, input {first} on {device}")
        allowed = {dtype, torch.bool} if i in conditions else {dtype}
        if operand.role == "scalar":  # read once and widened: an fp32 exponent of fp16 x is fine
            allowed |= set(_DTYPE)
        if t.dtype not in allowed:
            raise CodegenError(f"{what} has dtype {t.dtype}, expected {dtype}")
        if operand.role == "full" and tuple(t.shape) != shape:
            raise CodegenError(
                f"{what} has shape {tuple(t.shape)}, but input {first} sets the output to {shape}"
            )
        if operand.role == "row" and (
            t.dim() == 0 or t.shape[-1] != d or t.numel() != d or t.dim() > max(len(shape), 1)
        ):
            raise CodegenError(f"{what} has shape {tuple(t.shape)}; expected [{d}] for {shape}")
        if operand.role == "scalar" and t.numel() != 1:
            raise CodegenError(f"{what} has shape {tuple(t.shape)}; expected one element")

    out_dtypes = chain.out_dtypes(dtype_in)
    outputs = [torch.empty(shape, dtype=_TORCH[o], device=device) for o in out_dtypes]
    numel = outputs[0].numel()
    if numel == 0:
        return outputs
    config = config or choose_config(numel)
    kernel = _kernel(chain, dtype_in, out_dtypes)
    args = [t.contiguous() for t in tensors] + outputs + [numel]
    if any(o.role == "row" for o in chain.inputs):
        args.append(d)
    grid = (triton.cdiv(numel, config.BLOCK),)
    kernel[grid](
        *args, BLOCK=config.BLOCK, num_warps=config.num_warps, num_stages=config.num_stages
    )
    return outputs


@functools.lru_cache(maxsize=256)
def _kernel(chain: Chain, dtype_in: str, out_dtypes: tuple[str, ...]):
    # Rendering and hashing are pure functions of (chain, dtypes): do them once per chain.
    return load_kernel(render(chain, dtype_in, out_dtypes))


def _condition_only(chain: Chain) -> set[int]:
    """Inputs whose every use is a `Where` condition (they may be bool tensors)."""
    uses: dict[int, set[bool]] = {}
    for step in chain.steps:
        for position, a in enumerate(step.args):
            uses.setdefault(a, set()).add(step.op == "Where" and position == 0)
    for o in chain.outputs:
        uses.setdefault(o, set()).add(False)
    return {i for i in range(len(chain.inputs)) if uses.get(i) == {True}}
