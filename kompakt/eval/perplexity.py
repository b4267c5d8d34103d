"""Token perplexity of a causal LM on a text, with the convention stated.

Convention: the text is cut into non-overlapping windows of ``seq_len`` tokens (the last, shorter
piece is dropped); within each window every token after the first is predicted from the ones
before it; perplexity = exp(mean negative log-likelihood over all predicted tokens). For kompakt's
byte-level model a token is a byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kompakt.errors import KompaktError


def byte_windows(data: bytes, seq_len: int = 256, max_windows: int | None = None) -> torch.Tensor:
    """The text as [windows, seq_len] byte ids."""
    count = len(data) // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise KompaktError(f"text of {len(data)} bytes is shorter than one window of {seq_len}")
    ids = torch.frombuffer(bytearray(data[: count * seq_len]), dtype=torch.uint8).long()
    return ids.reshape(count, seq_len)


def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    data: bytes,
    seq_len: int = 256,
    batch_size: int = 8,
    max_windows: int | None = None,
) -> float:
    """Perplexity of ``logits_fn`` (input ids [B, T] -> logits [B, T, V]) on ``data``."""
    windows = byte_windows(data, seq_len, max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start : start + batch_size]
            logits = logits_fn(ids).float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(nll)
            count += ids[:, 1:].numel()
    return math.exp(total / count)
