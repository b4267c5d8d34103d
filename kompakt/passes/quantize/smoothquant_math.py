"""The arithmetic of SmoothQuant and of int8 activation quantization, on torch tensors.

SmoothQuant (Xiao et al., 2022, sec. 4) moves quantization difficulty from activations to
weights. For MatMuls sharing one input X [n, K] and weights W [K, N], per input channel j:

    s_j = max|X_j|^α / max_W(max|W_j,:|)^(1-α)          X W = (X diag(s)^-1) (diag(s) W)

so after smoothing both X / s and s W have per-channel ranges near sqrt(max|X_j| max|W_j|) at
α = 0.5. A channel whose activation or weights are all zero gets s = 1 (nothing to balance).

Int8 activation grids here are symmetric (zero point 0), over [-127, 127]:
- static per-tensor: one scale max|X| / 127 from calibration;
- dynamic per-token: each row's max|x| / 127, computed at run time.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
SCALE_FLOOR = 1e-5
"""Smoothing scales and the weight maxima they divide by are clamped to at least this (as the
paper's code does), so a near-zero weight row cannot blow a scale up to inf."""


def smoothing_scales(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s [K] for an input with per-channel max |x| ``act_absmax`` [K] shared by ``weights``
    ([K, N_i] each). Channels whose activation or weight maximum is zero get 1."""
    act = act_absmax.double()
    weight_max = torch.stack([w.detach().double().abs().amax(dim=1) for w in weights]).amax(dim=0)
    s = act.clamp(min=SCALE_FLOOR).pow(alpha) / weight_max.clamp(min=SCALE_FLOOR).pow(1 - alpha)
    s = s.clamp(min=SCALE_FLOOR)
    degenerate = (act == 0) | (weight_max == 0) | ~torch.isfinite(s)
    return torch.where(degenerate, torch.ones_like(s), s).float()


def channel_spread(absmax: torch.Tensor) -> float:
    """max_j / min_j of per-channel maxima, over channels that are not all zero (1 if none):
    how far apart the channel ranges are, which is what a per-tensor scale suffers from."""
    nonzero = absmax[absmax > 0]
    if nonzero.numel() == 0:
        return 1.0
    return float(nonzero.max() / nonzero.min())


def per_tensor_scale(absmax: torch.Tensor) -> float:
    """Symmetric int8 scale for a tensor whose largest magnitude is max(absmax); 1 if all zero."""
    top = float(absmax.max()) if absmax.numel() else 0.0
    return top / INT8_MAX if top > 0 else 1.0


def fake_quant_per_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x rounded onto the int8 grid of step ``scale`` (saturating like QuantizeLinear)."""
    return torch.round(x / scale).clamp(-INT8_MAX - 1, INT8_MAX) * scale


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """Each row of x rounded onto its own symmetric int8 grid."""
    top = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(top > 0, top / INT8_MAX, torch.ones_like(top))
    return torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX) * scale


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """W [K, N] rounded per output channel, symmetric int8 (quantize-weights{bits=8,
    group-size=-1,symmetric=true})."""
    top = w.abs().amax(dim=0, keepdim=True)
    scale = torch.where(top > 0, top / INT8_MAX, torch.ones_like(top))
    return torch.round(w / scale).clamp(-INT8_MAX - 1, INT8_MAX) * scale


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], act_scale: float) -> float:
    """Relative output MSE of static W8A8 (per-tensor activations, per-channel weights) against
    float, summed over the weights sharing x: sum ||xW - Q(x)Q(W)||² / sum ||xW||²."""
    xq = fake_quant_per_tensor(x, act_scale)
    noise = signal = 0.0
    for w in weights:
        reference = x @ w
        noise += float((xq @ fake_quant_weight(w) - reference).pow(2).sum())
        signal += float(reference.pow(2).sum())
    return noise / signal if signal > 0 else 0.0
