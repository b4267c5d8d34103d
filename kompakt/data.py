"""Calibration batches from text: ``text_batches(texts, tokenizer)``.

batches = kompakt.data.text_batches(sentences, tokenizer, batch_size=8, max_length=128)
cm = kompakt.compile(model, example_inputs=batches[0], target="cpu-w4-gptq", calibration=batches)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kompakt.errors import KompaktError


def text_batches(
    texts: Sequence[str],
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int = 128,
    with_attention_mask: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Tokenizes ``texts`` into padded batches of ``input_ids`` (and ``attention_mask``).

    Args:
        texts: The calibration texts (the order is kept; the last batch may be smaller).
        tokenizer: A Hugging Face tokenizer (anything callable like one).
        batch_size: Texts per batch.
        max_length: Longer texts are truncated to this many tokens.
        with_attention_mask: Include ``attention_mask`` (encoders usually take it; a causal LM
            captured with input_ids only does not).
    """
    if isinstance(texts, str):
        raise KompaktError("text_batches expects a list of texts, not one string")
    if not texts:
        raise KompaktError("text_batches got no texts")
    if batch_size < 1:
        raise KompaktError(f"batch_size must be at least 1, got {batch_size}")
    if getattr(tokenizer, "pad_token", "") is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LM tokenizers often have no pad token
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": encoded["input_ids"]}
        if with_attention_mask:
            batch["attention_mask"] = encoded["attention_mask"]
        batches.append(batch)
    return batches


def byte_batches(
    data: bytes, seq_len: int = 256, batch_size: int = 8, max_batches: int | None = None
) -> list[tuple[torch.Tensor]]:
    """Calibration batches for a byte-level LM (token id = byte): ``(input_ids,)`` tuples of
    [batch_size, seq_len] windows, consecutive and non-overlapping."""
    from kompakt.eval.perplexity import byte_windows

    windows = byte_windows(data, seq_len)
    batches = [(windows[i : i + batch_size],) for i in range(0, windows.shape[0], batch_size)]
    return batches[:max_batches] if max_batches is not None else batches
