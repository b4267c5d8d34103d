"""GPTQ (Frantar et al., 2022): quantize a weight column by column, compensating each column's
rounding error in the columns not yet quantized, weighted by the inverse Hessian of the inputs.

For a layer y = x W (W: [K, N], inputs x of K channels) and H = E[xᵀx] over calibration tokens,
GPTQ minimizes ||x W - x Ŵ||² one input channel (a row of W here; a "column" in the paper's
transposed notation) at a time:

    q_k = quant(w_k);   e = (w_k - q_k) / [H⁻¹]_kk;   w_j -= e · [H⁻¹]_kj  for the channels j after k

using the upper Cholesky factor of H⁻¹, in blocks of `block_size` channels whose updates to the
remaining channels are applied once per block ("lazy batch updates").

- dead inputs (H_kk = 0, never active) are zeroed and excluded;
- damping adds `damp` x mean(diag H) to the diagonal (more, in steps, if Cholesky still fails);
- act-order processes channels by decreasing H_kk. Groups stay contiguous in the original order
  (ONNX's blocked DequantizeLinear has no per-channel group index), so with act-order each group's
  scale and zero point are fixed up front from the original weights ("static groups"); without
  it, each group's parameters come from the weights as GPTQ has updated them when it gets there.
"""

from __future__ import annotations

import torch

from kompakt.passes.quantize.grid import Grid, QuantizedWeight, quantize_rtn, scales_for

DAMP_STEPS = (1.0, 10.0, 100.0)  # multipliers of `damp` tried if Cholesky fails


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = True,
    overwrite_hessian: bool = False,
) -> tuple[QuantizedWeight, float]:
    """Quantizes W [K, N] given H [K, K]; the scale keeps W's dtype.

    Returns the quantized weight and GPTQ's loss: the sum over channels of ||w_k - q_k||² /
    [H⁻¹]_kk² in the order solved, which equals tr(ΔᵀHΔ) for the damped H.

    With ``overwrite_hessian`` a float32 H's memory is reused for the inverse (H is K x K, 485 MB at
    K = 11008): at most two such matrices are alive. The caller must not read H afterwards.
    """
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {list(hessian.shape)} does not match weight {[k, n]}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    weight = w.float().clone()  # [K, N]: row k is input channel k
    h = hessian.float()
    if h is hessian and not overwrite_hessian:
        h = h.clone()
    dead = torch.diagonal(h) == 0
    torch.diagonal(h)[dead] = 1.0
    weight[dead] = 0.0

    rows = grid.rows_per_group(k)
    static = act_order or grid.group_size == -1
    scale, zero = scales_for(weight, grid) if static else (None, None)
    if not static:
        scale = torch.empty(grid.groups(k), n)
        zero = None if grid.symmetric else torch.empty(grid.groups(k), n)

    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    weight = weight[order]
    if act_order:  # permute in place; the temporaries live one line each
        h.copy_(h[order])
        h.copy_(h[:, order])
    hinv = _inverse_cholesky_in_place(h, damp)

    storage = torch.int8 if grid.symmetric else torch.uint8
    codes = torch.empty(k, n, dtype=storage)  # a quarter of a float copy
    loss = 0.0
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block = weight[start:end].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            channel = int(order[start + i])
            group = channel // rows
            if not static and channel % rows == 0:
                _fit_group(weight, block, start, i, rows, group, grid, scale, zero)
            s = scale[group]
            z = None if zero is None else zero[group]
            q = torch.round(block[i] / s) + (0 if z is None else z)
            q = q.clamp(grid.qmin, grid.qmax)
            codes[start + i] = q.to(storage)
            dequantized = (q - (0 if z is None else z)) * s
            error = (block[i] - dequantized) / hinv_block[i, i]
            loss += float(error.pow(2).sum())
            block[i:] -= error[None, :] * hinv_block[i, i:, None]
            errors[i] = error
        weight[end:].addmm_(hinv[start:end, end:].T, errors, alpha=-1)  # no [K, N] temporary

    codes = codes[torch.argsort(order)]
    zero_point = None if zero is None else zero.round().clamp(0, grid.qmax).to(storage)
    return QuantizedWeight(codes, scale.to(w.dtype), zero_point, grid), loss


def _fit_group(weight, block, start, i, rows, group, grid, scale, zero) -> None:
    """Group parameters from the weights as GPTQ has updated them so far (channels in order:
    the group's first channel is row ``i`` of the current block)."""
    span = torch.cat([block[i:], weight[start + block.shape[0] :]])[:rows]
    s, z = scales_for(span, Grid(grid.bits, -1, grid.symmetric))
    scale[group] = s[0]
    if zero is not None:
        zero[group] = z[0]


def _inverse_cholesky_in_place(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp x mean(diag H), raising λ if needed.

    ``h`` is damped in place and then overwritten with the inverse."""
    diagonal = torch.diagonal(h)
    mean_diag = float(diagonal.mean())
    added = 0.0
    for step in DAMP_STEPS:
        target = damp * step * mean_diag
        diagonal += target - added
        added = target
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) != 0:
            continue
        torch.cholesky_inverse(factor, out=h)
        del factor
        upper, info = torch.linalg.cholesky_ex(h, upper=True)
        if int(info) == 0:
            return upper
        break
    raise ValueError(
        "the Hessian is not positive definite even with damping; check the calibration data"
    )


def hessian_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Output error on the calibration inputs, relative: tr(ΔᵀHΔ) / tr(WᵀHW), Δ = W - Ŵ."""
    signal, noise = hessian_energy(w, hessian), 0.0
    for cols in _column_chunks(w.shape[1]):
        delta = w[:, cols].float() - approx[:, cols].float()
        noise += float(((hessian @ delta) * delta).sum())
    return noise / signal if signal > 0 else 0.0


def rtn_hessian_error(w: torch.Tensor, grid: Grid, hessian: torch.Tensor) -> float:
    """`hessian_error` of round-to-nearest, a chunk of output columns at a time (rounding one
    column does not depend on the others), so no full-size temporaries stand next to H."""
    signal, noise = hessian_energy(w, hessian), 0.0
    for cols in _column_chunks(w.shape[1]):
        part = w[:, cols].float()
        delta = part - quantize_rtn(part, grid).dequantize().float()
        noise += float(((hessian @ delta) * delta).sum())
    return noise / signal if signal > 0 else 0.0


def hessian_energy(w: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(WᵀHW), over column chunks (no full-size float temporaries next to H)."""
    total = 0.0
    for cols in _column_chunks(w.shape[1]):
        part = w[:, cols].float()
        total += float(((hessian @ part) * part).sum())
    return total


def _column_chunks(n: int, size: int = 1024) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
