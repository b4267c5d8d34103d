"""Triton kernel and launchers of the glu family: ``out = act(gate) * up``.

One elementwise kernel over a [rows, F] grid of tiles. gate and up are addressed by their own
row strides, so the packed form (gate and up as the two halves of one [rows, 2F] tensor) is the
same kernel with ``up_ptr = x_ptr + F`` and both strides 2F: no split or copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kompakt.codegen.glu.spec import KINDS, Config, choose_config
from kompakt.errors import CodegenError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Globals a @triton.jit function reads must be tl.constexpr.
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2), for erf-GELU
# tanh-GELU: 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) * (g + 0.044715 g^3);
# 2 * sqrt(2 / pi) = 1.5957691216057308. sigmoid saturates cleanly where tanh via exp overflows.
TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)
GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def glu_kernel(
    gate_ptr, up_ptr, out_ptr, n_rows, F, stride_gate, stride_up,
    KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    # Row blocks on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535).
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < n_rows)[:, None] & (cols < F)[None, :]
    g = tl.load(gate_ptr + rows[:, None] * stride_gate + cols[None, :], mask=mask, other=0.0)
    u = tl.load(up_ptr + rows[:, None] * stride_up + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if KIND == "silu":
        act = g * tl.sigmoid(g)
    elif KIND == "gelu":
        act = 0.5 * g * (1.0 + tl.erf(g * SQRT1_2))
    else:  # gelu_tanh
        # Tensor-first products: the interpreter cannot multiply a constexpr by a tensor.
        act = g * tl.sigmoid(g * (1.0 + g * g * GELU_CUBIC) * TWO_SQRT_2_OVER_PI)
    out = act * u.to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * F + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
    )


def launch_glu(
    gate: torch.Tensor, up: torch.Tensor, kind: str, config: Config | None = None
) -> torch.Tensor:
    """``act(gate) * up`` for gate, up [..., F] (same shape and dtype); out is contiguous."""
    _check_kind(kind)
    _check_tensor("glu", "gate", gate)
    _check_tensor("glu", "up", up, device=gate.device)
    if up.dtype != gate.dtype:
        raise CodegenError(f"glu: up has dtype {up.dtype} but gate has {gate.dtype}")
    if gate.dim() < 1 or up.shape != gate.shape:
        raise CodegenError(
            f"glu: gate and up must be the same [..., F], got {list(gate.shape)} and {list(up.shape)}"
        )
    f = gate.shape[-1]
    return _launch(_rows(gate, f), _rows(up, f), gate.shape, kind, config)


def launch_glu_packed(x: torch.Tensor, kind: str, config: Config | None = None) -> torch.Tensor:
    """``act(x[..., :F]) * x[..., F:]`` for x [..., 2F] (a merged gate/up projection)."""
    _check_kind(kind)
    _check_tensor("glu_packed", "x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise CodegenError(f"glu_packed: x must be [..., 2F] (even last dim), got {list(x.shape)}")
    f = x.shape[-1] // 2
    rows = _rows(x, 2 * f)
    return _launch(rows[:, :f], rows[:, f:], (*x.shape[:-1], f), kind, config)


def _launch(gate, up, shape, kind, config):
    out = torch.empty(shape, dtype=gate.dtype, device=gate.device)
    n_rows, f = gate.shape
    if out.numel() == 0:
        return out
    config = config or choose_config(n_rows, f)
    grid = (triton.cdiv(n_rows, config.block_m), triton.cdiv(f, config.block_f))
    glu_kernel[grid](
        gate, up, out, n_rows, f, gate.stride(0), up.stride(0),
        KIND=kind, BLOCK_M=config.block_m, BLOCK_F=config.block_f,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit column stride: a view when the layout allows, else a copy."""
    flat = t.reshape(-1, width)
    return flat if flat.stride(-1) == 1 or width == 1 else flat.contiguous()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise CodegenError(f"glu: unknown kind '{kind}'; known: {', '.join(KINDS)}")


def _check_tensor(op: str, name: str, t, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise CodegenError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPES)
        raise CodegenError(f"{op}: {name} has dtype {t.dtype}, expected one of: {known}")
    if device is not None and t.device != device:
        raise CodegenError(f"{op}: {name} is on {t.device} but gate is on {device}")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise CodegenError(f"{op}: {name} is on {t.device}; the Triton kernel needs CUDA")
