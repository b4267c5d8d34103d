"""Input validation of the attention launchers (no triton here: it needs none)."""

from __future__ import annotations

import torch

from kompakt.codegen.attention.spec import HEAD_DIMS, Config
from kompakt.errors import CodegenError

_DTYPES = (torch.float16, torch.float32)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str]):
    """Validates q/k/v; returns (B, Hq, Sq, D, Hkv, Skv)."""
    for name, t in zip(("q", *names), (q, k, v), strict=True):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise CodegenError(f"attention: {name} must be a 4-D tensor [B, H, S, D], got {shape}")
        if t.dtype not in _DTYPES:
            raise CodegenError(f"attention: {name} has dtype {t.dtype}; supported: fp16, fp32")
        if t.dtype != q.dtype or t.device != q.device:
            raise CodegenError(
                f"attention: {name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}"
            )
    batch, heads_q, seq_q, head_dim = q.shape
    if k.shape != v.shape:
        raise CodegenError(f"attention: {names[0]} {tuple(k.shape)} != {names[1]} {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise CodegenError(
            f"attention: {names[0]} {tuple(k.shape)} does not match q {tuple(q.shape)} in batch "
            "or head dim"
        )
    if head_dim not in HEAD_DIMS:
        raise CodegenError(f"attention: head dim D={head_dim} of q is not one of {HEAD_DIMS}")
    heads_kv, seq_kv = k.shape[1], k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise CodegenError(
            f"attention: Hq={heads_q} (q {tuple(q.shape)}) is not a multiple of Hkv={heads_kv} "
            f"({names[0]} {tuple(k.shape)})"
        )
    if seq_kv == 0:
        raise CodegenError(f"attention: {names[0]} {tuple(k.shape)} has no keys (Skv = 0)")
    return batch, heads_q, seq_q, head_dim, heads_kv, seq_kv


def check_config(config: Config) -> None:
    """Block sizes must be powers of two >= 16 (tl.arange and tl.dot need it)."""
    for name in ("block_m", "block_n"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise CodegenError(f"attention: config.{name}={value} must be a power of two >= 16")
    if config.num_splits < 1:
        raise CodegenError(f"attention: config.num_splits={config.num_splits} must be >= 1")


def check_lengths(lengths: torch.Tensor, batch: int, device: torch.device) -> None:
    """Decode's valid-key counts: a [B] int32/int64 tensor on q's device."""
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (batch,):
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths)
        raise CodegenError(f"attention: lengths must be a [{batch}] tensor, got {shape}")
    if lengths.dtype not in (torch.int32, torch.int64) or lengths.device != device:
        raise CodegenError(
            f"attention: lengths is {lengths.dtype} on {lengths.device}; "
            f"needs int32/int64 on {device}"
        )


_MASK_DTYPES = (torch.float16, torch.float32, torch.bool)


def check_mask(mask: torch.Tensor, scores: tuple[int, int, int, int], device: torch.device):
    """An additive (fp16/fp32) or keep (bool) mask broadcastable to the scores [B, Hq, Sq, Skv];
    returns it as a 4-D view of that shape, with stride 0 on the broadcast dims (no copy)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise CodegenError(f"attention: mask must be a tensor of rank <= 4, got {shape}")
    if mask.dtype not in _MASK_DTYPES or mask.device != device:
        raise CodegenError(
            f"attention: mask is {mask.dtype} on {mask.device}; needs fp16/fp32/bool on {device}"
        )
    full = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if any(m not in (1, s) for m, s in zip(full, scores, strict=True)):
        raise CodegenError(
            f"attention: mask {tuple(mask.shape)} does not broadcast to the scores "
            f"[B, Hq, Sq, Skv] = {list(scores)}"
        )
    return mask.reshape(full).expand(scores)
