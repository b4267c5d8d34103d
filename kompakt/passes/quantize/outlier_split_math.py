"""The math of outlier-split: which activation channels / weights go to high precision.

LLM.int8() (Dettmers et al., 2022, sec. 3.2, mixed-precision decomposition): a MatMul input
channel whose magnitude exceeds a threshold (6.0 in the paper) is an *outlier feature*; its row of
W stays in float, every other row is quantized to int8 per output channel ("vector-wise").

SpQR (Dettmers et al., 2023, sec. 4 and Algorithm 1): W is quantized group-wise (small groups of
input channels per output column) by GPTQ's column-by-column solver, and a sparse set of weights
is kept in high precision. A weight is an outlier when leaving it out of its group's statistics
(min/max) and keeping it exact lowers the group's error by the most, each weight's squared
rounding error weighted by 1 / [H^-1]_kk^2 as in GPTQ ("leave-one-out" sensitivity, sec. 4.1).
Outliers are excluded from the scale/zero fit, so their groups get tighter ranges, and they take
part in the error compensation like every other weight (their own error being only float16's).

Differences from the paper, all forced by standard ONNX or chosen for simplicity:
- the paper thresholds the sensitivity with a relative τ; here a budget (at most a fraction of the
  weights) sets τ as the sensitivity quantile on the original weights, and the solver, which
  re-detects each group on the weights as updated so far, never exceeds the budget;
- group statistics are float16 scales and integer zero points (the paper quantizes them again to
  3 bits, which DequantizeLinear cannot express);
- no act-order permutation (it would break the contiguous groups blocked DequantizeLinear needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kompakt.passes.quantize.gptq_math import _inverse_cholesky_in_place
from kompakt.passes.quantize.grid import Grid, QuantizedWeight

HALF_MAX = float(torch.finfo(torch.float16).max)
HALF_TINY = float(torch.finfo(torch.float16).tiny)
_CHUNK_ELEMENTS = 1 << 23  # leave-one-out temporaries per chunk of groups (32 MB of float32)


# --- LLM.int8(): outlier feature channels -------------------------------------------------------


def outlier_channels(
    absmax: torch.Tensor, threshold: float, max_fraction: float
) -> tuple[torch.Tensor, int]:
    """Input channels whose calibration max |x| exceeds ``threshold``, loudest first capped at
    ``floor(max_fraction * K)`` (and at K - 1, so the int8 part is never empty).

    Returns the chosen channels (sorted ascending) and how many over-threshold channels the cap
    left in int8."""
    k = absmax.shape[0]
    loud = torch.nonzero(absmax > threshold).flatten()
    cap = min(int(max_fraction * k), k - 1)
    if loud.numel() <= cap:
        return loud, 0
    order = torch.argsort(absmax[loud], descending=True, stable=True)
    return torch.sort(loud[order[:cap]]).values, int(loud.numel() - cap)


def split_rows(k: int, outliers: torch.Tensor) -> torch.Tensor:
    """The complement of ``outliers`` in range(k): the int8 rows, ascending."""
    keep = torch.ones(k, dtype=torch.bool)
    keep[outliers] = False
    return torch.nonzero(keep).flatten()


# --- SpQR: group statistics that ignore outliers, and leave-one-out sensitivity -----------------


def masked_scales(
    values: torch.Tensor, keep: torch.Tensor | None, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point over dim -2 of ``values`` [..., rows, N], counting only ``keep``.

    The same formulas as grid.scales_for (range contains 0; an empty or all-zero group gets scale
    1), with the scale then rounded to float16, the type it is stored in."""
    if grid.symmetric:
        magnitude = values.abs() if keep is None else torch.where(keep, values.abs(), 0.0)
        amax = magnitude.amax(-2)
        scale = torch.where(amax > 0, amax / grid.qmax, torch.ones_like(amax))
        return _half(scale), None
    lo_src = values if keep is None else torch.where(keep, values, float("inf"))
    hi_src = values if keep is None else torch.where(keep, values, float("-inf"))
    lo = lo_src.amin(-2).clamp(max=0)
    hi = hi_src.amax(-2).clamp(min=0)
    scale = _half(torch.where(hi > lo, (hi - lo) / grid.qmax, torch.ones_like(hi)))
    zero = torch.round(-lo / scale).clamp(0, grid.qmax)
    return scale, zero


def _half(scale: torch.Tensor) -> torch.Tensor:
    """The float16 value a scale is stored as (kept positive and finite)."""
    return scale.clamp(HALF_TINY, HALF_MAX).half().float()


def fake_quantize(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and dequantized values (as float16 DequantizeLinear computes them) of ``values``
    [..., rows, N] under per-column ``scale``/``zero`` [..., N]."""
    z = 0.0 if zero is None else zero.unsqueeze(-2)
    s = scale.unsqueeze(-2)
    q = (torch.round(values / s) + z).clamp(grid.qmin, grid.qmax)
    return q, ((q - z) * s).half().float()


def leave_one_out_gains(groups: torch.Tensor, cost: torch.Tensor, grid: Grid) -> torch.Tensor:
    """SpQR's sensitivity of every weight in ``groups`` [..., g, N]: the group's weighted
    rounding error minus what it would be with that weight left out of the statistics and kept
    exact. ``cost`` [..., g] weighs each row's squared error (1 / [H^-1]_kk^2)."""
    g = groups.shape[-2]
    cost = cost.unsqueeze(-1)
    scale, zero = masked_scales(groups, None, grid)
    _, dequantized = fake_quantize(groups, scale, zero, grid)
    base = (cost * (groups - dequantized).pow(2)).sum(-2)  # [..., N]
    others = ~torch.eye(g, dtype=torch.bool).unsqueeze(-1)  # [g_left_out, g, 1]
    repeated = groups.unsqueeze(-3).expand(*groups.shape[:-2], g, g, groups.shape[-1])
    scale, zero = masked_scales(repeated, others, grid)  # [..., g_left_out, N]
    _, dequantized = fake_quantize(repeated, scale, zero, grid)
    error = torch.where(others, cost.unsqueeze(-3) * (repeated - dequantized).pow(2), 0.0)
    return base.unsqueeze(-2) - error.sum(-2)


def sensitivity_threshold(weight: torch.Tensor, cost: torch.Tensor, grid: Grid, budget: int):
    """τ such that about ``budget`` weights of W [K, N] have a positive leave-one-out gain >= τ
    (inf when the budget is 0 or no weight gains anything)."""
    if budget <= 0:
        return float("inf")
    k, n = weight.shape
    g = grid.rows_per_group(k)
    chunk = max(1, _CHUNK_ELEMENTS // (g * g * n))
    gains = []
    for start in range(0, k, g * chunk):
        rows = weight[start : start + g * chunk]
        full = rows.shape[0] // g * g
        if full:
            batch = rows[:full].reshape(-1, g, n)
            costs = cost[start : start + full].reshape(-1, g)
            gains.append(leave_one_out_gains(batch, costs, grid).flatten())
        if full < rows.shape[0]:  # a short last group
            tail = slice(start + full, start + rows.shape[0])
            gains.append(leave_one_out_gains(weight[tail], cost[tail], grid).flatten())
    flat = torch.cat(gains)
    flat = flat[flat > 0]
    if flat.numel() == 0:
        return float("inf")
    return float(torch.topk(flat, min(budget, flat.numel())).values[-1])


# --- SpQR solver -------------------------------------------------------------------------------


@dataclass
class SparseQuantized:
    """A weight quantized SpQR-style: ``base`` (its scale float16) plus float16 ``values`` at
    the flat positions ``index`` (row-major over [K, N]) that replace the base there."""

    base: QuantizedWeight
    index: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float16 [nnz]
    loss: float  # GPTQ's loss under the damped Hessian

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the emitted ONNX computes."""
        flat = self.base.dequantize().flatten().clone()  # float16, as DequantizeLinear gives
        flat[self.index] = self.values
        return flat.reshape(self.base.q.shape).float()


def spqr_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    outlier_fraction: float,
    block_size: int = 128,
    damp: float = 0.01,
) -> SparseQuantized:
    """Quantizes W [K, N] with GPTQ-style error compensation given H [K, K], keeping at most
    ``floor(outlier_fraction * K * N)`` weights in float16 (Algorithm 1 of the SpQR paper)."""
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian of shape {list(hessian.shape)} does not match weight {[k, n]}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf")
    if w.numel() and float(w.abs().max()) > HALF_MAX:
        raise ValueError("weight exceeds the float16 range its scales and outliers are stored in")
    if grid.group_size == -1:
        raise ValueError("SpQR needs groups (group_size != -1)")
    weight = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0  # inputs never active: their weights cannot matter
    torch.diagonal(h)[dead] = 1.0
    weight[dead] = 0.0
    hinv = _inverse_cholesky_in_place(h, damp)
    diag = torch.diagonal(hinv).clone()
    cost = diag.pow(-2)

    rows = grid.rows_per_group(k)
    budget = int(outlier_fraction * k * n)
    tau = sensitivity_threshold(weight, cost, grid, budget)
    used = 0
    outlier = torch.zeros(k, n, dtype=torch.bool)
    stored = torch.zeros(k, n, dtype=torch.float16)
    scale = torch.ones(grid.groups(k), n)
    zero = None if grid.symmetric else torch.zeros(grid.groups(k), n)
    codes = torch.empty(k, n, dtype=torch.int8 if grid.symmetric else torch.uint8)
    span = rows * max(1, block_size // rows)  # lazy-update blocks hold whole groups
    loss = 0.0
    for start in range(0, k, span):
        end = min(start + span, k)
        block = weight[start:end].clone()
        errors = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            row = start + i
            group = row // rows
            if row % rows == 0:  # detect this group's outliers on the weights as updated so far
                members = block[i : i + rows]
                picked = _pick(members, cost[row : row + members.shape[0]], grid, tau)
                picked = _within_budget(picked, budget - used, members, cost, row, grid)
                used += int(picked.sum())
                outlier[row : row + members.shape[0]] = picked
                s, z = masked_scales(members, ~picked, grid)
                scale[group] = s
                if zero is not None:
                    zero[group] = z
            z = None if zero is None else zero[group]
            q, dequantized = fake_quantize(block[i : i + 1], scale[group], z, grid)
            q, dequantized = q[0], dequantized[0]
            mask = outlier[row]
            exact = block[i].clamp(-HALF_MAX, HALF_MAX).half()
            dequantized = torch.where(mask, exact.float(), dequantized)
            stored[row] = torch.where(mask, exact, 0.0)
            codes[row] = torch.where(mask, 0.0 if z is None else z, q).to(codes.dtype)
            error = (block[i] - dequantized) / hinv_block[i, i]
            loss += float(error.pow(2).sum())
            block[i:] -= error[None, :] * hinv_block[i, i:, None]
            errors[i] = error
        weight[end:] -= hinv[start:end, end:].T @ errors

    zero_point = None if zero is None else zero.to(codes.dtype)
    base = QuantizedWeight(codes, scale.half(), zero_point, grid)
    index = torch.nonzero(outlier.flatten()).flatten()
    return SparseQuantized(base, index, stored.flatten()[index], loss)


def _pick(members: torch.Tensor, cost: torch.Tensor, grid: Grid, tau: float) -> torch.Tensor:
    if tau == float("inf"):
        return torch.zeros_like(members, dtype=torch.bool)
    gains = leave_one_out_gains(members, cost, grid)
    return (gains >= tau) & (gains > 0)


def _within_budget(picked, remaining: int, members, cost, row: int, grid: Grid) -> torch.Tensor:
    """``picked``, reduced to its ``remaining`` most sensitive weights if it has more."""
    count = int(picked.sum())
    if count <= remaining:
        return picked
    if remaining <= 0:
        return torch.zeros_like(picked)
    gains = leave_one_out_gains(members, cost[row : row + members.shape[0]], grid)
    gains = torch.where(picked, gains, float("-inf")).flatten()
    keep = torch.zeros_like(gains, dtype=torch.bool)
    keep[torch.topk(gains, remaining).indices] = True
    return keep.reshape(picked.shape)
