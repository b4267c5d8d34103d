"""Low-rank compensation of a quantization error (ZeroQuant-V2's LoRC, Yao et al., 2023, sec. 5).

For a weight W [K, N] and its quantized Ŵ, the error E = W - Ŵ is approximated by its best
rank-r approximation (truncated SVD, Eckart-Young): E ≈ U_r Σ_r V_rᵀ, split evenly into two
factors A = U_r Σ_r^½ [K, r] and B = Σ_r^½ V_rᵀ [r, N], so both have the same range, which keeps
their 8-bit per-channel quantization (the paper's choice) accurate. Then W ≈ Ŵ + A B.
"""

from __future__ import annotations

import torch

from kompakt.passes.quantize.grid import Grid, QuantizedWeight, quantize_rtn

FACTOR_GRID = Grid(bits=8, group_size=-1, symmetric=True)
"""Factors are stored as int8 with one scale per output channel (column)."""


def resolve_rank(rank: float, k: int, n: int) -> int:
    """A rank >= 1 is taken as is, a fraction in (0, 1) of min(K, N); capped at min(K, N)."""
    full = min(k, n)
    wanted = round(rank * full) if rank < 1 else int(rank)
    return max(1, min(wanted, full))


def lowrank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [K, r], B [r, N] (float32) with A B the best rank-r approximation of ``error``."""
    u, s, vh = torch.linalg.svd(error.float(), full_matrices=False)
    root = s[:rank].clamp(min=0).sqrt()
    return u[:, :rank] * root[None, :], root[:, None] * vh[:rank]


def quantize_factor(factor: torch.Tensor) -> QuantizedWeight:
    """int8 per-column symmetric quantization of a factor (zero columns get scale 1)."""
    return quantize_rtn(factor.float(), FACTOR_GRID)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||reference - approx||_F / ||reference||_F (the absolute error when reference is 0)."""
    ref = reference.double()
    noise = float((ref - approx.double()).norm())
    signal = float(ref.norm())
    return noise / signal if signal > 0 else noise
