"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up
before rounding, and clip weight ranges where that lowers the output error.

Scale search: for MatMuls sharing an input x (e.g. q/k/v), with per-channel activation salience
a = mean|x|, try s = a^α for α on a grid in [0, 1); W' = diag(s) W is quantized and the input is
divided by s, so y ≈ (x / s) Q(diag(s) W). Keep the α with the least error in the output of the
module that contains the MatMuls (all of the attention for q/k/v: errors in q and k matter only
through the softmax), measured on calibration tokens; α = 0 (s = 1) is plain round-to-nearest, so
the search never does worse on those tokens.

Clip search: for each group of input channels and each output channel, try shrinking the
weights' range to max|w| x (1 - i/20), i < 10, quantize, and keep the range with the least error
in that group's contribution to the output, x_g W_g.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kompakt.passes.quantize.grid import Grid, group_view, quantize_rtn, round_to_grid, scales_for

SCALE_GRID = 20  # α in {0, 1/20, ..., 19/20}, as the paper
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5  # try ranges down to half of max|w|


def _fake_quantize(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    return quantize_rtn(w, grid).dequantize().float()


def search_scales(
    weights: list[torch.Tensor],
    salience: torch.Tensor,
    grid: Grid,
    error_of: Callable[[list[torch.Tensor]], float],
) -> tuple[torch.Tensor, float, float, float]:
    """Best per-channel scale s [K] for weights sharing one input.

    ``error_of(candidates)`` measures the output error when the weights are replaced by the
    candidates (each Q(diag(s) W) / s, i.e. seen from the unscaled input): the AWQ paper measures
    it on the output of the module that contains the MatMuls (the attention, the MLP).

    Returns (s, α, error at α, error of plain RTN, α = 0).
    """
    salience = salience.float().clamp(min=1e-4)
    floats = [w.float() for w in weights]
    best = (torch.ones_like(salience), 0.0, float("inf"))
    rtn_error = float("nan")
    for step in range(SCALE_GRID):
        alpha = step / SCALE_GRID
        s = salience.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        candidates = [(_fake_quantize(w * s[:, None], grid) / s[:, None]) for w in floats]
        error = error_of(candidates)
        if step == 0:
            rtn_error = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2], rtn_error


def linear_error(
    x: torch.Tensor, weights: list[torch.Tensor]
) -> Callable[[list[torch.Tensor]], float]:
    """Output error of the MatMuls themselves, for a MatMul that is a module of its own."""
    x = x.float()
    references = [x @ w.float() for w in weights]
    return lambda candidates: sum(
        float((x @ c - r).pow(2).mean()) for c, r in zip(candidates, references, strict=True)
    )


def search_clip(w: torch.Tensor, x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """W [K, N] with each (group, output channel) range clipped where it lowers x_g W_g's error."""
    k, n = w.shape
    groups = group_view(w.float(), grid)  # [G, rows, N]
    rows = groups.shape[1]
    x = x.float()
    if x.shape[1] < groups.shape[0] * rows:  # pad tokens' channels like the weight rows
        x = torch.cat([x, x.new_zeros(x.shape[0], groups.shape[0] * rows - x.shape[1])], dim=1)
    per_group = Grid(grid.bits, -1, grid.symmetric)
    clipped = groups.clone()
    for g in range(groups.shape[0]):
        wg = groups[g]  # [rows, N]
        xg = x[:, g * rows : (g + 1) * rows]  # [n, rows]
        reference = xg @ wg
        limit = wg.abs().amax(0)  # [N]
        best_error = torch.full((n,), float("inf"))
        best_limit = limit.clone()
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            cap = limit * (1 - step / CLIP_GRID)
            candidate = torch.maximum(torch.minimum(wg, cap), -cap)
            scale, zero = scales_for(candidate, per_group)
            q = round_to_grid(candidate, scale, zero, per_group)
            approx = (q - (0 if zero is None else zero)) * scale
            error = (xg @ approx - reference).pow(2).mean(0)  # [N]
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_limit = torch.where(better, cap, best_limit)
        clipped[g] = torch.maximum(torch.minimum(wg, best_limit), -best_limit)
    return clipped.reshape(-1, n)[:k].to(w.dtype)
