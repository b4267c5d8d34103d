"""Token generation over a graph captured with a static KV cache (kompakt.lowering.kv_cache).

`generate` drives any backend's ``run(feeds) -> list[Tensor]``: it preallocates zeroed caches
``[B, Hkv, S_max, D]``, runs the prompt once (prefill: S tokens at positions 0..S-1), then one
token at a time (decode: S = 1 at position p), feeding each step's returned caches into the next.
It never reads a cache it has fed again, so ``run`` may update the caches in place
(`CompiledModel.generate` passes ``donate=True``; kompakt.runtime.in_place).

Token choice follows Hugging Face's ``generate``: greedy is ``argmax`` (first index on ties);
sampling applies temperature, then top-k, then top-p (nucleus), then draws from the softmax.
After a row emits an end-of-sequence token it is padded; generation stops when every row has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from kompakt.errors import InputError
from kompakt.lowering.kv_cache import CacheSpec

Run = Callable[[Mapping[str, torch.Tensor]], Sequence[torch.Tensor]]


def generate(
    run: Run,
    spec: CacheSpec,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Generates up to ``max_new_tokens`` tokens after each row of ``input_ids``.

    Args:
        run: A backend's run: graph inputs by name -> graph outputs in `spec.output_names` order.
        spec: The cache graph's `CacheSpec` (from `capture_with_cache`).
        input_ids: ``[B, S]`` integer prompt tokens (no padding: every row is S real tokens).
        max_new_tokens: How many tokens to add at most; S + max_new_tokens - 1 slots must fit in
            the cache (the last token is returned, never written).
        do_sample: Sample instead of taking the argmax.
        temperature, top_k, top_p: Sampling filters (top_k = 0 and top_p = 1 disable them).
        seed: Seeds the sampler's own generator (reproducible draws); None uses torch's global RNG.
        eos_token_id: Token id(s) that end a row.
        pad_token_id: What a finished row gets after its end token; default: the first eos id.

    Returns:
        ``[B, S + n]`` int64 ids, prompt first, with n <= max_new_tokens (fewer when every row
        ended early).

    Raises:
        InputError: a malformed prompt, a prompt too long for the cache, or bad sampling options.
    """
    batch, length = _check(spec, input_ids, max_new_tokens)
    eos = _eos_ids(eos_token_id)
    _check_sampling(do_sample, temperature, top_k, top_p)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    device = input_ids.device
    ids = input_ids.to(torch.int64)
    if max_new_tokens == 0:
        return ids
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    where = {name: i for i, name in enumerate(spec.output_names)}
    logits_at = where[spec.logits]
    present_at = [where[name] for name in spec.present]
    caches = spec.empty_caches(batch, device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    eos_tensor = torch.tensor(eos, dtype=torch.int64, device=device)

    step_ids = ids
    positions = torch.arange(length, dtype=torch.int64, device=device)
    out = [ids]
    for _ in range(max_new_tokens):
        feeds = {spec.input_ids: step_ids, spec.cache_position: positions, **caches}
        results = run(feeds)
        caches = {name: results[i] for name, i in zip(spec.past, present_at, strict=True)}
        last = results[logits_at][:, -1, :]
        if do_sample:  # on the CPU, where the seeded generator draws
            token = _sample(last.float().cpu(), temperature, top_k, top_p, generator)
        else:  # where the logits are: only the ids reach the host
            token = last.argmax(dim=-1)
        token = token.to(device)
        if eos:
            token = torch.where(unfinished, token, torch.full_like(token, pad))
            unfinished &= ~torch.isin(token, eos_tensor)
        out.append(token[:, None])
        if eos and not bool(unfinished.any()):
            break
        step_ids = token[:, None]
        positions = positions[-1:] + 1
    return torch.cat(out, dim=1)


def _check(spec: CacheSpec, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[int, int]:
    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise InputError(
            f"input_ids must be integer [batch, sequence], got "
            f"{str(input_ids.dtype).replace('torch.', '')}{list(input_ids.shape)}"
        )
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise InputError(
            f"input_ids must hold at least one token per row, got {list(input_ids.shape)}"
        )
    if spec.batch is not None and batch != spec.batch:
        raise InputError(
            f"input_ids has batch {batch}, but the cache graph was captured for batch {spec.batch}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    needed = length + max(max_new_tokens - 1, 0)
    if needed > spec.max_length:
        raise InputError(
            f"a prompt of {length} tokens plus {max_new_tokens} new ones needs {needed} cache "
            f"slots, but the cache holds max_length={spec.max_length}"
        )
    return batch, length


def _eos_ids(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(t) for t in eos_token_id]


def _check_sampling(do_sample: bool, temperature: float, top_k: int, top_p: float) -> None:
    if not do_sample:
        return
    if not temperature > 0:
        raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One token per row from fp32 logits [B, V]."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Hugging Face's sampling warpers, in its order: temperature, top-k, top-p. Filtered-out
    tokens get -inf. ``logits`` is [B, V]."""
    scores = logits / temperature
    if top_k > 0:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th survive
    if top_p < 1.0:
        # Drop the least likely tokens whose total probability stays within 1 - top_p; the
        # most likely token always survives.
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores
