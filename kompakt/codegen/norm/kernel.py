"""Triton kernel and launchers of the norm family (RMSNorm, LayerNorm, optional fused residual).

One kernel serves both norms (``LAYER_NORM`` picks the math at compile time). A program owns
``ROWS`` rows. When a row fits one tile (``ONE_BLOCK``) it is read once and stays in registers;
otherwise it is streamed in ``BLOCK_D`` chunks: a statistics pass (two for LayerNorm, whose
variance is taken around the mean, not as E[x^2] - mean^2, which cancels badly) and an output pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kompakt.codegen.norm.spec import Config, choose_config
from kompakt.errors import CodegenError

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _load_row(
    x_ptr, res_ptr, sum_ptr, rows, cols, mask, D, stride_x, stride_res, HAS_RESIDUAL: tl.constexpr
):
    """x (+ residual) for a [ROWS, BLOCK] tile in fp32; stores the sum, rounded to x's dtype."""
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
        # Round the sum to x's dtype first: it is the next layer's residual stream, and the norm
        # must see the same number the unfused "add, then norm" would.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + rows[:, None] * D + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def norm_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr,
    n_rows, D, stride_x, stride_res, eps,
    LAYER_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, ROWS: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    # int64 row offsets: rows * stride passes 2^31 elements at long sequence x batch sizes.
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    row_ok = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < D)[None, :]
        h = _load_row(
            x_ptr, res_ptr, sum_ptr, rows, cols, mask, D, stride_x, stride_res, HAS_RESIDUAL
        )
        if LAYER_NORM:
            mean = tl.sum(h, axis=1) / D
            h = tl.where(mask, h - mean[:, None], 0.0)  # padded lanes must not add to the variance
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        y = h * rstd[:, None] * w[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask
        )
    else:
        # Pass 1: the sum (LayerNorm) or the sum of squares (RMSNorm), lane-wise in fp32.
        acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            mask = row_ok[:, None] & (c < D)[None, :]
            h = _load_row(
                x_ptr, res_ptr, sum_ptr, rows, c, mask, D, stride_x, stride_res, HAS_RESIDUAL
            )
            if LAYER_NORM:
                acc += h
            else:
                acc += h * h
        if HAS_RESIDUAL:
            # Later passes re-read the sum this program just stored, possibly from other threads.
            tl.debug_barrier()
            src_ptr = sum_ptr
            stride_src = D
        else:
            src_ptr = x_ptr
            stride_src = stride_x
        if LAYER_NORM:
            mean = tl.sum(acc, axis=1) / D
            acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for start in range(0, D, BLOCK_D):  # pass 2: the variance around the mean
                c = start + cols
                mask = row_ok[:, None] & (c < D)[None, :]
                h = tl.load(src_ptr + rows[:, None] * stride_src + c[None, :], mask=mask, other=0.0)
                h = tl.where(mask, h.to(tl.float32) - mean[:, None], 0.0)
                acc += h * h
        else:
            mean = tl.zeros([ROWS], dtype=tl.float32)
        rstd = tl.rsqrt(tl.sum(acc, axis=1) / D + eps)
        for start in range(0, D, BLOCK_D):  # last pass: normalize, scale, shift, store
            c = start + cols
            mask = row_ok[:, None] & (c < D)[None, :]
            h = tl.load(src_ptr + rows[:, None] * stride_src + c[None, :], mask=mask, other=0.0)
            w = tl.load(w_ptr + c, mask=c < D, other=0.0).to(tl.float32)
            y = (h.to(tl.float32) - mean[:, None]) * rstd[:, None] * w[None, :]
            if HAS_BIAS:
                y += tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
            tl.store(
                out_ptr + rows[:, None] * D + c[None, :], y.to(out_ptr.dtype.element_ty), mask=mask
            )


def launch_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., D] with weight [D]; ``(out, x + residual)`` when a residual is given."""
    return _launch(x, weight, None, eps, residual, config, layer_norm=False)


def launch_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of x [..., D] (weight [D], bias [D] or None); ``(out, summed)`` with a residual."""
    return _launch(x, weight, bias, eps, residual, config, layer_norm=True)


def _launch(x, weight, bias, eps, residual, config, *, layer_norm):
    op = "layer_norm" if layer_norm else "rms_norm"
    _check_tensor(op, "x", x, DTYPES)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise CodegenError(f"{op}: x must be [..., D] with D > 0, got shape {list(x.shape)}")
    d = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None and name == "bias":
            continue
        _check_tensor(op, name, param, DTYPES, device=x.device)
        if tuple(param.shape) != (d,):
            raise CodegenError(
                f"{op}: {name} must be [{d}] for x {list(x.shape)}, got {list(param.shape)}"
            )
    if residual is not None:
        _check_tensor(op, "residual", residual, (x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise CodegenError(
                f"{op}: residual shape {list(residual.shape)} must equal x shape {list(x.shape)}"
            )
    if not eps >= 0.0:  # also rejects NaN
        raise CodegenError(f"{op}: eps must be >= 0, got {eps}")
    rows_x = _rows(x, d)
    n_rows = rows_x.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    if n_rows > 0:
        rows_res = _rows(residual, d) if residual is not None else rows_x
        config = config or choose_config(n_rows, d)
        grid = (triton.cdiv(n_rows, config.rows),)
        norm_kernel[grid](
            rows_x, rows_res, weight.contiguous(), weight if bias is None else bias.contiguous(),
            out, out if summed is None else summed,
            n_rows, d, rows_x.stride(0), rows_res.stride(0), float(eps),
            LAYER_NORM=layer_norm, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_D=config.block_d, ROWS=config.rows, ONE_BLOCK=config.one_block(d),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return out if summed is None else (out, summed)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """t as [rows, D] with unit feature stride: a view when the layout allows, else a copy."""
    flat = t.reshape(-1, d)
    return flat if flat.stride(-1) == 1 or d == 1 else flat.contiguous()


def _check_tensor(op, name, t, dtypes, device=None):
    if not isinstance(t, torch.Tensor):
        raise CodegenError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        known = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise CodegenError(f"{op}: {name} has dtype {t.dtype}, expected one of: {known}")
    if device is not None and t.device != device:
        raise CodegenError(f"{op}: {name} is on {t.device} but x is on {device}")
    if t.device.type != "cuda" and not _interpreting():
        raise CodegenError(f"{op}: {name} is on {t.device}; the Triton kernel needs a CUDA tensor")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
