"""Decode steps of a static-KV-cache model run split-K decode attention on the Triton backend.

A decode step is attention of one query over all Smax cache slots, the additive mask hiding the
slots not written yet; the attention binder sends such calls to `launch_flash_decode` (with the
mask) once the heuristic splits the keys, and the prompt's prefill to `launch_flash_prefill`.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tokens

import kompakt

pytest.importorskip("triton")


def test_a_static_cache_llama_decodes_through_split_k_like_hugging_face(tiny, monkeypatch):
    from kompakt.codegen.attention import kernel, spec

    # The heuristic splits only caches of 256+ slots per split (see spec.MIN_KEYS_PER_SPLIT); a
    # 64-slot cache is what the interpreter runs in seconds, so split it every 16 slots instead.
    monkeypatch.setattr(spec, "MIN_KEYS_PER_SPLIT", 16)
    calls = {"decode": 0, "prefill": 0}
    decode, prefill = kernel.launch_flash_decode, kernel.launch_flash_prefill

    def spy_decode(q, k_cache, v_cache, lengths, scale=None, config=None, mask=None, **rest):
        calls["decode"] += 1
        assert q.shape[2] == 1 and k_cache.shape[2] == 64 and lengths is None
        assert mask is not None and config.num_splits > 1
        return decode(q, k_cache, v_cache, lengths, scale, config, mask, **rest)

    def spy_prefill(*args, **kwargs):
        calls["prefill"] += 1
        return prefill(*args, **kwargs)

    monkeypatch.setattr(kernel, "launch_flash_decode", spy_decode)
    monkeypatch.setattr(kernel, "launch_flash_prefill", spy_prefill)

    model = tiny("llama")
    prompt = tokens((1, 5))
    cm = kompakt.compile(
        model, (prompt,), target="a100", kv_cache=64, backend="triton", device="cpu",
        progress=False,
    )  # fmt: skip
    assert "attention x2" in cm._backend.summary()
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
    got = cm.generate(prompt, max_new_tokens=5)
    assert torch.equal(got.cpu(), want)
    layers = 2  # the tiny llama's attention layers ("attention x2")
    # The prompt runs prefill; each of the 4 steps after the first token runs decode.
    assert calls["decode"] == 4 * layers, calls
    assert calls["prefill"] >= layers, calls
    assert "fell back" not in cm._backend.summary()
