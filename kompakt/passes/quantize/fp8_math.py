"""Float8 E4M3 (float8e4m3fn) scaling and rounding (Micikevicius et al., 2022, "FP8 Formats for
Deep Learning", sec. 3-4).

E4M3 has 4 exponent and 3 mantissa bits, no infinities and one NaN pattern ("fn"); its largest
finite value is 448 and its relative rounding error is at most 2^-4 for normal values (down to
2^-6; below that, subnormals step by 2^-9). A tensor is scaled so that its largest magnitude
maps to 448, then rounded to nearest-even with saturation:

    s = max|x| / 448,    q = e4m3(clamp(x / s, -448, 448)),    x ≈ q * s

A zero range gets s = 1 (everything is exactly 0), never a division by zero.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def e4m3_scale(amax: torch.Tensor) -> torch.Tensor:
    """max|x| -> the scale mapping it to 448 (1 where max|x| is 0), float32."""
    amax = amax.float()
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def weight_scale(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """Scale of W [K, N]: one per output channel [N], or one for the tensor (a 0-d tensor)."""
    magnitude = w.float().abs()
    return e4m3_scale(magnitude.amax(dim=0) if per_channel else magnitude.amax())


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes of x / scale (round to nearest even, saturating at +-448)."""
    scaled = x.float() / scale.float()
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded through E4M3 and back, float32."""
    return to_e4m3(x, scale).float() * scale.float()
