"""A causal LM with a static KV cache as explicit graph inputs and outputs, and its capture.

`CacheWrapper` turns a Hugging Face causal LM into a pure function of tensors::

    (input_ids [B, S], cache_position [S], k_0, v_0, ..., k_{L-1}, v_{L-1})
        -> (logits [B, S, V], k_0', v_0', ..., k_{L-1}', v_{L-1}')

where every cache is ``[B, Hkv, S_max, D]``. The S new tokens' keys/values are written at
``cache_position`` out of place (``index_copy``, not ``index_copy_``), so the captured graph has no
mutation: the caller feeds the returned caches back in. Attention runs over all ``S_max`` slots
with an additive mask that hides every slot after the query's own position, so slots not yet
written never change the result. One graph serves prefill (S prompt tokens at positions
0..S-1) and decode (S = 1 at position p).

How: HF models call ``past_key_values.update(k, v, layer_idx)`` and attend over what it returns.
`_functional_cache` builds a `transformers.Cache` whose layers hold the input caches and whose update
returns the out-of-place result (keeping it for the wrapper to return). The 4-D mask is passed as
``attention_mask``: HF's mask builders return a 4-D mask as is (masking_utils
``_preprocess_mask_arguments``), and ``position_ids = cache_position`` drives the rotary
embedding, so HF never asks the cache how many tokens it holds.

Tested (transformers 5.23): Llama, Qwen2, GPT-2 and OPT decode step by step exactly like their
full forward; Llama (fp32 and fp16) and Qwen2 captured graphs generate exactly what HF generates.
Needs one K and V per layer and full causal attention: models with sliding-window layers are
refused unless the window covers max_length. No padding input: every prompt row is real tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import onnx_ir as ir
import torch
from torch import nn

from kompakt.errors import CaptureError
from kompakt.ir.tensors import torch_dtype

LOGITS = "logits"
INPUT_IDS = "input_ids"
CACHE_POSITION = "cache_position"
KINDS = ("key", "value")


def past_name(layer: int, kind: str) -> str:
    """Graph input name of layer ``layer``'s cache; ``kind`` is "key" or "value"."""
    return f"past.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """Graph output name of layer ``layer``'s updated cache."""
    return f"present.{layer}.{kind}"


@dataclass(frozen=True)
class CacheSpec:
    """What `generate` needs to know about a captured cache graph.

    Attributes:
        num_layers, num_kv_heads, head_dim, max_length: each cache is
            ``[batch, num_kv_heads, max_length, head_dim]``.
        batch: the captured batch size, or None when the batch dim is symbolic.
        dtype: the caches' dtype (the model's).
        vocab_size: the logits' last dim.
        past: cache input names, in order k_0, v_0, k_1, v_1, ...
        present: cache output names, in the same order.
        output_names: every graph output, in the order a backend's run returns them.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_length: int
    batch: int | None
    dtype: torch.dtype
    vocab_size: int
    past: tuple[str, ...]
    present: tuple[str, ...]
    output_names: tuple[str, ...]
    input_ids: str = INPUT_IDS
    cache_position: str = CACHE_POSITION
    logits: str = LOGITS

    def cache_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.max_length, self.head_dim)

    def empty_caches(
        self, batch: int, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Zeroed caches, by input name."""
        return {
            name: torch.zeros(self.cache_shape(batch), dtype=self.dtype, device=device)
            for name in self.past
        }


def _functional_cache(caches: list[torch.Tensor], cache_position: torch.Tensor):
    """A `transformers.Cache` over the given tensors whose update is out of place."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _Layer(CacheLayerMixin):
        is_compileable = True  # fixed shapes: HF treats it like its StaticLayer

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:  # already allocated
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            index = cache_position.to(self.keys.device)
            self.keys = self.keys.index_copy(2, index, key_states.to(self.keys.dtype))
            self.values = self.values.index_copy(2, index, value_states.to(self.values.dtype))
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[2], 0  # attention always spans the whole static cache

        def get_seq_length(self):
            # Tokens before the first new one (positions are contiguous). HF only asks when
            # position_ids is missing; the wrapper always passes them.
            return cache_position[0]

        def get_max_length(self) -> int:
            return self.keys.shape[2]

    layers = [_Layer(caches[i], caches[i + 1]) for i in range(0, len(caches), 2)]
    return Cache(layers=layers)


def _sliding_window(config) -> int | None:
    """The window of the model's sliding/chunked attention layers, or None when all are full."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None) or getattr(
        config, "attention_chunk_size", None
    )
    if types is not None:
        return window if any(t != "full_attention" for t in types) else None
    return window  # no per-layer types: HF applies the window to every layer when it is set


class CacheWrapper(nn.Module):
    """A HF causal LM as ``forward(input_ids, cache_position, *caches) -> (logits, *caches)``.

    The model's top-level submodules are registered under their own names (the model object
    itself is held outside the module tree), so weights and module paths in a captured graph
    read ``model.layers.0.self_attn.q_proj`` exactly as in a plain capture of the model.

    Args:
        model: A HF ``*ForCausalLM`` (Llama/Qwen2 family). Not modified.
        max_length: S_max, the number of cache slots (prompt + generated tokens).
    """

    def __init__(self, model: nn.Module, max_length: int) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None:
            raise CaptureError(
                f"CacheWrapper needs a Hugging Face causal LM with a config, got {type(model).__name__}"
            )
        self._hf = (model,)  # a tuple: not registered as a submodule (see the class docstring)
        for name, child in model.named_children():
            self.add_module(name, child)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        self.vocab_size = text.vocab_size
        self.max_length = int(max_length)
        limit = getattr(text, "max_position_embeddings", None)
        if self.max_length < 1 or (limit is not None and self.max_length > limit):
            raise CaptureError(
                f"max_length must be in 1..{limit} (the model's max_position_embeddings), "
                f"got {max_length}"
            )
        window = _sliding_window(text)
        if window is not None and window < self.max_length:
            raise CaptureError(
                f"{type(model).__name__} has sliding-window (or chunked) attention layers of window "
                f"{window}; the static-cache mask is full causal, so max_length must be <= "
                f"{window} (got {max_length})"
            )

    @property
    def dtype(self) -> torch.dtype:
        return next(self._hf[0].parameters()).dtype

    def cache_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_kv_heads, self.max_length, self.head_dim)

    def forward(
        self, input_ids: torch.Tensor, cache_position: torch.Tensor, *caches: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if len(caches) != 2 * self.num_layers:
            raise CaptureError(
                f"expected {2 * self.num_layers} caches (a key and a value per layer), got "
                f"{len(caches)}"
            )
        model = self._hf[0]
        slots = caches[0].shape[2]
        dtype = caches[0].dtype
        # Query at position p sees slots 0..p: the causal mask, extended over unwritten slots.
        # Hidden slots get -inf, not finfo.min: every row sees at least its own slot, so no
        # softmax row is all -inf, and the decode kernel can tell exactly which slots no query
        # sees and skip reading them (kompakt/codegen/attention).
        allowed = torch.arange(slots, device=input_ids.device)[None, :] <= cache_position[:, None]
        zero = torch.zeros((), dtype=dtype, device=input_ids.device)
        hidden = torch.full((), float("-inf"), dtype=dtype, device=input_ids.device)
        mask = torch.where(allowed, zero, hidden)[None, None]  # [1, 1, S, S_max]
        cache = _functional_cache(list(caches), cache_position)
        out = model(
            input_ids=input_ids,
            position_ids=cache_position[None, :].expand(input_ids.shape[0], -1),
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        )
        updated = []
        for layer in cache.layers:
            updated += [layer.keys, layer.values]
        return (out.logits, *updated)


class _Named(nn.Module):
    """Keyword inputs by graph name -> dict of outputs by graph name, for capture_module."""

    def __init__(self, wrapper: CacheWrapper) -> None:
        super().__init__()
        self._wrapper = (wrapper,)
        for name, child in wrapper.named_children():
            self.add_module(name, child)

    def forward(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        wrapper = self._wrapper[0]
        past = [tensors[past_name(i, k)] for i in range(wrapper.num_layers) for k in KINDS]
        logits, *present = wrapper(tensors[INPUT_IDS], tensors[CACHE_POSITION], *past)
        names = [present_name(i, k) for i in range(wrapper.num_layers) for k in KINDS]
        return {LOGITS: logits, **dict(zip(names, present, strict=True))}


def capture_with_cache(
    model: nn.Module, batch: int = 1, max_length: int = 128, dynamic_batch: bool = True
) -> tuple[ir.Model, CacheSpec]:
    """Captures ``CacheWrapper(model, max_length)`` with kompakt's capture path.

    The sequence dim (input_ids dim 1, cache_position dim 0) is symbolic, so the same graph runs
    prefill and decode; with ``dynamic_batch`` the batch dim (input_ids and caches dim 0) is too,
    else it is fixed to ``batch``. S_max is fixed.

    Returns:
        The IR and the `CacheSpec` naming its cache inputs/outputs.

    Raises:
        CaptureError: the model does not fit the wrapper, or capture failed.
    """
    from kompakt.lowering.from_torch import capture_module

    wrapper = CacheWrapper(model, max_length)
    if batch < 1:
        raise CaptureError(f"batch must be >= 1, got {batch}")
    # Example prompt length: any size >= 2 (torch.export fixes dims of size 1, and capture_module
    # would widen one anyway); 3 keeps the trace small. S_max itself stays fixed.
    sequence = min(max_length, 3)
    dtype = wrapper.dtype
    device = _device_of(model)  # the trace runs the model once: examples live where it does
    feeds: dict[str, torch.Tensor] = {
        INPUT_IDS: torch.zeros((batch, sequence), dtype=torch.int64, device=device),
        CACHE_POSITION: torch.arange(sequence, dtype=torch.int64, device=device),
    }
    past = [past_name(i, k) for i in range(wrapper.num_layers) for k in KINDS]
    for name in past:
        feeds[name] = torch.zeros(wrapper.cache_shape(batch), dtype=dtype, device=device)
    batch_dim = {0: "batch"} if dynamic_batch else None
    dynamic = {
        INPUT_IDS: {0: "batch", 1: "sequence"} if dynamic_batch else {1: "sequence"},
        CACHE_POSITION: {0: "sequence"},
        **{name: batch_dim for name in past},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = capture_module(_Named(wrapper), feeds, dynamic_shapes=dynamic)
    graph.graph.name = f"{type(model).__name__}WithCache"
    spec = cache_spec_of(graph)
    if spec is None or spec.num_layers != wrapper.num_layers:
        names = [v.name for v in (*graph.graph.inputs, *graph.graph.outputs)]
        raise CaptureError(f"the captured graph lost its cache inputs/outputs; it has {names}")
    return graph, spec


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def cache_spec_of(model: ir.Model) -> CacheSpec | None:
    """The `CacheSpec` of a graph captured by `capture_with_cache` (after any pipeline, or
    loaded from disk: it reads only the graph's input/output names and shapes), or None when
    the graph has no KV-cache inputs."""
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs if not v.is_initializer()}
    outputs = [v.name for v in graph.outputs]
    layers = 0
    while past_name(layers, "key") in inputs:
        layers += 1
    if layers == 0:
        return None
    past = tuple(past_name(i, k) for i in range(layers) for k in KINDS)
    present = tuple(present_name(i, k) for i in range(layers) for k in KINDS)
    missing = [n for n in (INPUT_IDS, CACHE_POSITION, *past) if n not in inputs]
    missing += [n for n in (LOGITS, *present) if n not in outputs]
    if missing:
        raise CaptureError(f"graph '{graph.name}' has KV-cache inputs but lacks {missing}")
    cache = inputs[past[0]]
    shape = list(cache.shape) if cache.shape is not None else []
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise CaptureError(
            f"cache input '{past[0]}' must be [batch, heads, max_length, head_dim] with fixed "
            f"heads, max_length and head_dim; got {cache.shape}"
        )
    logits = next(v for v in graph.outputs if v.name == LOGITS)
    vocab = logits.shape[-1] if logits.shape is not None else None
    return CacheSpec(
        num_layers=layers,
        num_kv_heads=shape[1],
        head_dim=shape[3],
        max_length=shape[2],
        batch=shape[0] if isinstance(shape[0], int) else None,
        dtype=torch_dtype(cache.dtype, past[0]) if cache.dtype is not None else torch.float32,
        vocab_size=vocab if isinstance(vocab, int) else -1,
        past=past,
        present=present,
        output_names=tuple(outputs),
    )


def with_empty_caches(spec: CacheSpec, batches) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for a cache graph: each prompt as a prefill from an empty cache.

    Takes what ``calibration=`` takes for the plain model (tuples whose first tensor is the
    token ids, or dicts with ``input_ids``) and adds ``cache_position`` and zeroed caches. The
    graph never writes its cache inputs, so batches of one size share one set of zeros.
    """
    zeros: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    out = []
    for batch in batches:
        ids = batch.get(INPUT_IDS) if isinstance(batch, dict) else batch[0]
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise CaptureError(
                "calibration for a kv_cache model needs token ids [batch, sequence] per batch"
            )
        key = (ids.shape[0], str(ids.device))
        if key not in zeros:
            zeros[key] = spec.empty_caches(ids.shape[0], ids.device)
        out.append({INPUT_IDS: ids, CACHE_POSITION: torch.arange(ids.shape[1]), **zeros[key]})
    return out
