"""Torch reference of the attention family: what every kernel variant must compute.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g(h), j]) * v[b, g(h), j]

with q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] and g(h) = h // (Hq // Hkv) (grouped-query attention:
consecutive query heads share one kv head). Scores, softmax and the weighted sum are fp32; the
result is cast to q's dtype at the end, as the kernels do.

Masks:
    causal   query i sees keys j <= i + (Skv - Sq): the queries are the last Sq positions of the
             Skv-long sequence (bottom-right alignment), so Sq == Skv is the usual lower triangle
             and Sq < Skv is a chunk of new tokens attending to a cache plus itself.
    lengths  [B] int32: only keys j < lengths[b] of batch b are valid (a static KV cache with room
             for more).
    mask     broadcastable to [B, Hq, Sq, Skv]: a float mask is added to the scaled scores (0 keeps,
             -inf or a large negative value such as finfo.min hides), a bool mask keeps the keys
             where it is True.

A row that sees no key at all (lengths[b] == 0, or a mask that is -inf across the row) is defined
as zeros, which is what the kernels write, rather than the NaN a plain softmax gives: this is
torch's decomposed SDPA as torch.onnx exports it, Where(IsNaN(Softmax(s)), 0, Softmax(s)).
"""

from __future__ import annotations

import math

import torch


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, Hq, Sq, D] over k/v [B, Hkv, Skv, D]; returns [B, Hq, Sq, D] in q's dtype.

    Args:
        q, k, v: Query, key and value; Hq must be a multiple of Hkv.
        causal: Apply the bottom-right aligned causal mask (needs Sq <= Skv).
        scale: Multiplies the scores; 1/sqrt(D) when None.
        lengths: Valid keys per batch, [B] int; None means all Skv keys are valid.
        mask: Additive float or keep-where-True bool mask, broadcastable to [B, Hq, Sq, Skv].
    """
    batch, heads_q, seq_q, head_dim = q.shape
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    if heads_q % heads_kv:
        raise ValueError(f"Hq={heads_q} is not a multiple of Hkv={heads_kv}")
    if causal and seq_q > seq_kv:
        raise ValueError(f"causal attention needs Sq <= Skv, got Sq={seq_q}, Skv={seq_kv}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads_q // heads_kv
    # The reference may repeat k/v; only the kernels must not.
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = scale * (q.float() @ kf.transpose(-1, -2))  # [B, Hq, Sq, Skv]
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask.to(q.device), float("-inf"))
    elif mask is not None:
        scores = scores + mask.to(q.device).float()

    keys = torch.arange(seq_kv, device=q.device)
    valid = torch.ones(batch, 1, seq_q, seq_kv, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(seq_q, device=q.device)
        valid = valid & (keys[None, :] <= rows[:, None] + (seq_kv - seq_q))
    if lengths is not None:
        valid = valid & (keys[None, None, None, :] < lengths.to(q.device).view(batch, 1, 1, 1))
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid key -> zeros
    return (probs @ vf).to(q.dtype)
