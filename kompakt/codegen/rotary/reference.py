"""Torch reference of the rotary family: rotary position embedding, Hugging Face convention.

    out[..., :R] = x[..., :R] * cos + rotate_half(x[..., :R]) * sin
    out[..., R:] = x[..., R:]                                   (R = rotary_dim = cos.shape[-1])
    rotate_half(v) = cat(-v[..., R/2:], v[..., :R/2])

x is [B, H, S, D]; cos and sin are [S, R], [B or 1, S, R] or [B or 1, 1, S, R]. The math is fp32
(Hugging Face runs it in x's dtype; fp32 rounds once instead of three times); out has x's dtype.
"""

from __future__ import annotations

import torch


def as_batch_seq_dim(table: torch.Tensor) -> torch.Tensor:
    """A cos/sin table as [B or 1, S, R] (drops a size-1 head dim, adds a batch dim)."""
    if table.dim() == 4 and table.shape[1] == 1:
        return table[:, 0]
    if table.dim() == 2:
        return table.unsqueeze(0)
    return table


def rotate_half(v: torch.Tensor) -> torch.Tensor:
    half = v.shape[-1] // 2
    return torch.cat([-v[..., half:], v[..., :half]], dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the first ``cos.shape[-1]`` features of x [B, H, S, D]; the rest pass through."""
    cos = as_batch_seq_dim(cos).float().unsqueeze(1)  # [B or 1, 1, S, R]: broadcast over heads
    sin = as_batch_seq_dim(sin).float().unsqueeze(1)
    r = cos.shape[-1]
    rot = x[..., :r].float()
    out = rot * cos + rotate_half(rot) * sin
    return torch.cat([out, x[..., r:].float()], dim=-1).to(x.dtype)
