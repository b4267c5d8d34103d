"""Flash-style attention kernels: prefill (many queries) and decode (one query, split-K).

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, g, j]) v[b, g, j];  g = h // (Hq/Hkv)

q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], Hq a multiple of Hkv (grouped-query attention, done by
index math: k/v are never repeated in memory), D in {16, 32, 64, 128}, fp16 or fp32 inputs with
fp32 softmax and accumulation (fp32 inputs run their dots as 3xTF32), output in q's dtype.

- `launch_flash_prefill(q, k, v, causal=True, scale=None, mask=None)`: optional bottom-right
  aligned causal mask (query i sees keys j <= i + Skv - Sq) and an optional mask broadcastable to
  [B, Hq, Sq, Skv], added to the scores (fp32/fp16) or keeping keys where True (bool). Rows that
  see no key give zeros (torch.onnx's SDPA: Where(IsNaN(softmax), 0, softmax)).
- `launch_flash_decode(q, k_cache, v_cache, lengths, scale=None, config=None, mask=None)`:
  Sq == 1 against a static KV cache of which only the first lengths[b] keys are live (None: all)
  and, optionally, those a mask broadcastable to [B, Hq, 1, Skv] keeps (as prefill's); the key
  axis is split across programs and the partial softmaxes combined by the program that finishes
  last (or, with ``Config(one_launch=False)``, by a second kernel).

`attention_reference` (plain torch) defines the semantics; `.bind` binds the ``attention`` fused
node of the fuse-attention pass to the prefill kernel, or to decode for one query per sequence.
The launchers live in `.kernel`, which needs triton; they are loaded on first use, so importing
this package does not import triton.
"""

from __future__ import annotations

from kompakt.codegen.attention.reference import attention_reference
from kompakt.codegen.attention.spec import Config, aot_variants, choose_config, cost

__all__ = [
    "Config",
    "aot_variants",
    "attention_reference",
    "choose_config",
    "cost",
    "launch_flash_decode",
    "launch_flash_prefill",
]


def __getattr__(name: str):
    if name in ("launch_flash_prefill", "launch_flash_decode"):
        from kompakt.codegen.attention import kernel

        return getattr(kernel, name)
    raise AttributeError(f"module 'kompakt.codegen.attention' has no attribute '{name}'")
