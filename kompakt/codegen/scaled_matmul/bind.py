"""Binds a ``scaled_matmul`` fused node (passes/fuse/fuse_quantized_matmul.py) to the int8 / fp8 GEMM.

The weight is read once, here: int8 or float8_e4m3fn codes [K, N] and an fp32 scale [N] or [].
Each call gets the activation's codes and scale, then runs ``y = (xq @ wq) * x_scale * w_scale
(+ bias)`` with the int8 family's (sm_80+) or the fp8 family's (sm_89+) launcher:

- ``xq`` role (the quantization is shared, outside the node): the codes and scale as given.
- ``x`` with the scale computed in the body (dynamic, per token or per tensor) on an fp32 x, with
  the kernels' qmax (127 / 448): the family's quantize kernel, which gives the body's codes bit
  for bit (the same IEEE division, round half to even, saturation). Its scale differs only where
  max|x_row| / qmax is below the body's floor (``tiny``): for an all-zero row (codes 0 either
  way, so y is the same) and for subnormal rows (|y| < 1e-35 either way).
- anything else (a static scale, fp16 / bf16 x, whose body computes the scale and the division
  in that type, other constants): the body's own quantization nodes, run by the reference
  runtime's torch ops, so the codes are the body's exactly. The families have no quantize kernel
  for a given scale; with one, the static path would be a single pass too.

The GEMM sums exact products (int32, or fp32 for e4m3) and scales once in fp32; the body
dequantizes each operand and sums in its float type, so the two agree up to float rounding.
A non-zero zero point (asymmetric codes) raises `CodegenError`: the backend then runs the body.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import torch

from kompakt.codegen.binding import input_roles
from kompakt.codegen.devices import exact_arch
from kompakt.codegen.scaled_matmul.spec import capability
from kompakt.errors import CodegenError
from kompakt.ir.fused import body_of
from kompakt.ir.tensors import to_torch
from kompakt.passes.fuse.match import const_scalar, const_tensor, is_op

_ROLES = (
    "x", "xq", "act_scale", "act_zero", "act_axes", "act_qmax", "act_floor",
    "wq", "w_scale", "w_zero", "bias",
)  # fmt: skip
_D = ir.DataType
# kind -> (ONNX code type, torch code type, the quantize kernel's qmax, lowest compute capability)
_KINDS = {
    "int8": (_D.INT8, torch.int8, 127.0, 80),  # int8 mma.sync from Ampere on
    "fp8": (_D.FLOAT8E4M3FN, torch.float8_e4m3fn, 448.0, 89),  # fp8 MMA from Ada on
}
_OUT = {_D.FLOAT: torch.float32, _D.FLOAT16: torch.float16, _D.BFLOAT16: torch.bfloat16}
_SCALES = ("static", "per_token", "per_tensor_dynamic")

Quantizer = Callable[[tuple], tuple[torch.Tensor, torch.Tensor]]


def bind(node: ir.Node, device: torch.device) -> Callable[..., torch.Tensor]:
    """A kernel closure taking the fused node's inputs (the weight's are ignored: read already)."""
    where = f"scaled-matmul node '{node.name}'"
    kind, act_scale = _string(node, "kind"), _string(node, "act_scale")
    if kind not in _KINDS or act_scale not in _SCALES:
        raise CodegenError(f"{where}: kind '{kind}' / act_scale '{act_scale}' is not supported")
    _, torch_code, qmax, lowest = _KINDS[kind]
    arch = exact_arch(device)
    if capability(arch) < lowest:
        raise CodegenError(f"{where}: the {kind} matmul needs sm_{lowest}+, the device is {arch}")
    index = input_roles(node, _ROLES, where)
    if "wq" not in index or "w_scale" not in index or ("x" in index) == ("xq" in index):
        raise CodegenError(f"{where}: needs the roles wq, w_scale and one of x / xq")
    if len(node.outputs) != 1 or node.outputs[0].dtype not in _OUT:
        raise CodegenError(f"{where}: the kernel writes one fp16 / bf16 / fp32 output")
    out_dtype = _OUT[node.outputs[0].dtype]
    for role in ("w_zero", "act_zero"):
        if role in index:
            _require_zero(node.inputs[index[role]], role, where)
    body = body_of(node)
    matmul = next(n for n in body if is_op(n, "MatMul"))
    dq_x, dq_w = (v.producer() for v in matmul.inputs)
    wq, w_scale = _weight(node, index, dq_w, torch_code, where)
    wq, w_scale = wq.to(device), w_scale.to(device)

    if "xq" in index:
        if "act_scale" not in index:
            raise CodegenError(f"{where}: codes given (xq) without their scale (act_scale)")
        xq_at, scale_at = index["xq"], index["act_scale"]
        how = "given"

        def quantize(inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
            return inputs[xq_at], inputs[scale_at]
    else:
        q = dq_x.inputs[0].producer()
        if node.inputs[index["x"]].dtype not in _OUT or not is_op(q, "QuantizeLinear"):
            raise CodegenError(f"{where}: x must be fp16 / bf16 / fp32 and quantized in the body")
        fast = _kernel_quantizes_like_body(node, index, q, act_scale, qmax)
        how = "kernel" if fast else "body"
        quantize = (_by_kernel if fast else _by_body)(node, index, body, q, torch_code, act_scale)

    from kompakt.codegen.fp8_matmul.kernel import launch_fp8_matmul
    from kompakt.codegen.int8_matmul.kernel import launch_int8_matmul

    launch = launch_int8_matmul if kind == "int8" else launch_fp8_matmul
    bias_at = index.get("bias")
    per_token = act_scale == "per_token"

    def kernel(*inputs: torch.Tensor) -> torch.Tensor:
        xq, scale = quantize(inputs)
        if xq.dtype != torch_code:
            raise CodegenError(f"{where}: the activation codes are {xq.dtype}, not {torch_code}")
        # The body's scale is [..., 1] per token or one value; the kernel takes [...] or [].
        lead = xq.shape[:-1] if per_token and scale.dim() else ()
        x_scale = scale.to(torch.float32).reshape(lead)
        bias = None if bias_at is None else inputs[bias_at]
        return launch(xq, x_scale, wq, w_scale, bias, out_dtype)

    kernel.quantize = how  # "given" codes, the family's quantize "kernel", or the "body"'s ops
    return kernel


def _weight(node, index, dq: ir.Node, torch_code, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes [K, N] and an fp32 scale [N] (per column) or [] (per tensor)."""
    q_value, s_value = node.inputs[index["wq"]], node.inputs[index["w_scale"]]
    q_tensor, s_tensor = const_tensor(q_value), const_tensor(s_value)
    if q_tensor is None or s_tensor is None:
        raise CodegenError(f"{where}: the weight codes and scale must be constants")
    wq, scale = to_torch(q_tensor), to_torch(s_tensor).to(torch.float32)
    if wq.dtype != torch_code or wq.dim() != 2:
        raise CodegenError(f"{where}: weight '{q_value.name}' must be {torch_code} [K, N]")
    k, n = wq.shape
    block = dq.attributes.get("block_size")
    if block is not None and 0 < block.value < k:
        raise CodegenError(f"{where}: weight groups of {block.value} along K = {k}")
    if scale.numel() == 1:
        return wq.contiguous(), scale.reshape(())
    if scale.numel() != n:
        raise CodegenError(f"{where}: weight scale {list(scale.shape)} is not per column ([{n}])")
    return wq.contiguous(), scale.reshape(n).contiguous()


def _require_zero(value: ir.Value, role: str, where: str) -> None:
    tensor = const_tensor(value)
    if tensor is None:
        raise CodegenError(f"{where}: the {role} '{value.name}' is not a constant")
    if bool((to_torch(tensor).to(torch.float32) != 0).any()):
        raise CodegenError(
            f"{where}: the {role} '{value.name}' is non-zero (asymmetric); the kernels multiply "
            "symmetric codes"
        )


def _kernel_quantizes_like_body(node, index, q: ir.Node, act_scale: str, qmax: float) -> bool:
    """Whether the family's quantize kernel gives the body's codes bit for bit (see above)."""
    if act_scale == "static" or "act_scale" in index or "act_qmax" not in index:
        return False  # a given scale: the kernels only compute their own
    x = node.inputs[index["x"]]
    floor = const_scalar(node.inputs[index["act_floor"]]) if "act_floor" in index else None
    fp32 = x.dtype == _D.FLOAT and q.attributes.get("precision") is None
    saturating = q.attributes.get("saturate") is None or q.attributes["saturate"].value == 1
    if not (fp32 and saturating and const_scalar(node.inputs[index["act_qmax"]]) == qmax):
        return False
    if floor is None or not 0 < floor <= torch.finfo(torch.float32).tiny:
        return False
    red = next(n for n in body_of(node) if is_op(n, "ReduceMax"))
    axes = const_tensor(node.inputs[index["act_axes"]]) if "act_axes" in index else None
    rank = len(x.shape) if x.shape is not None else None
    if axes is None:  # no axes: all of them, unless told to reduce nothing
        noop = red.attributes.get("noop_with_empty_axes")
        return act_scale == "per_tensor_dynamic" and (noop is None or noop.value == 0)
    dims = to_torch(axes).reshape(-1).tolist()
    if act_scale == "per_token":
        return dims in ([-1], [rank - 1] if rank else [-1])
    return rank is not None and sorted(d % rank for d in dims) == list(range(rank))


def _by_kernel(node, index, body, q, torch_code, act_scale: str) -> Quantizer:
    """The family's quantize kernel (one launch per row, plus an amax pass per tensor)."""
    from kompakt.codegen.scaled_matmul.launch import quantize_rows

    x_at, per_row = index["x"], act_scale == "per_token"

    def quantize(inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(inputs[x_at], torch_code, per_row)

    return quantize


def _by_body(node, index, body: ir.Graph, q: ir.Node, torch_code, act_scale: str) -> Quantizer:
    """The body's QuantizeLinear (and scale computation), run by the reference runtime's ops."""
    from kompakt.runtime.reference.registry import build_kernel

    opset = node.attributes["opset"].value if "opset" in node.attributes else 21
    order = [n for n in body if n is q or _feeds(n, q)]
    steps = [(build_kernel(n, opset), n.inputs, n.outputs) for n in order]
    slots = [id(v) for v in body.inputs]
    xq_id, scale_id = id(q.outputs[0]), id(q.inputs[1])

    def quantize(inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        env = dict(zip(slots, inputs, strict=True))
        for kernel, ins, outs in steps:
            result = kernel(*(None if v is None else env[id(v)] for v in ins))
            results = (result,) if isinstance(result, torch.Tensor) else tuple(result)
            env.update((id(v), t) for v, t in zip(outs, results, strict=False))
        return env[xq_id], env[scale_id]

    return quantize


def _feeds(node: ir.Node, target: ir.Node) -> bool:
    """``node``'s results reach ``target`` (the scale computation before the QuantizeLinear)."""
    stack, seen = [target], set()
    while stack:
        current = stack.pop()
        for value in current.inputs:
            producer = value.producer() if value is not None else None
            if producer is node:
                return True
            if producer is not None and id(producer) not in seen:
                seen.add(id(producer))
                stack.append(producer)
    return False


def _string(node: ir.Node, name: str) -> str | None:
    attr = node.attributes.get(name)
    return attr.as_string() if attr is not None else None
