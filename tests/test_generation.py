"""Generation with a static KV cache: the cache wrapper, its capture, and the decode loop.

The contract: kompakt's greedy output equals Hugging Face's ``generate(do_sample=False)`` token
for token, on every backend that runs the captured graph.
"""

from __future__ import annotations

import warnings

import pytest
import tiny_models
import torch
from conftest import tokens

import kompakt
from kompakt.errors import CaptureError, InputError
from kompakt.lowering.kv_cache import (
    CacheSpec,
    CacheWrapper,
    cache_spec_of,
    capture_with_cache,
)
from kompakt.runtime.backends import make_backend
from kompakt.runtime.generation import filter_logits, generate

MAX_LENGTH = 24  # cache slots: a 6-token prompt + 8 new tokens fit, with room for edge cases
NEW = 8


def _hf_generate(model, ids, **kwargs):
    """HF's greedy/eos reference. pad_token_id is given so HF does not warn about it."""
    kwargs.setdefault("eos_token_id", None)
    kwargs.setdefault("pad_token_id", 0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kwargs)


def _capture(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return capture_with_cache(model, **kwargs)


@pytest.fixture(scope="module")
def llama_cache(tiny):
    return _capture(tiny("llama"), batch=2, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def runs(llama_cache):
    """backend name -> run(feeds); onnxruntime is skipped where it does not load."""
    graph, _ = llama_cache
    found = {"reference": make_backend("reference", graph).run}
    try:
        found["onnxruntime"] = make_backend("onnxruntime", graph).run
    except Exception as err:  # ORT missing or rejecting the graph: report, do not fail
        found["onnxruntime"] = err
    return found


def _run(runs, backend):
    run = runs[backend]
    if isinstance(run, Exception):
        pytest.skip(f"onnxruntime backend did not load: {run}")
    return run


# --- the wrapper, eagerly -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_wrapper_prefill_then_decode_matches_full_forward(tiny, family):
    model = tiny(family)
    wrapper = CacheWrapper(model, MAX_LENGTH)
    ids = tokens((2, 8), seed=1)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        caches = [torch.zeros(wrapper.cache_shape(2)) for _ in range(2 * wrapper.num_layers)]
        before = [c.clone() for c in caches]
        logits, *caches_after = wrapper(ids[:, :5], torch.arange(5), *caches)
        torch.testing.assert_close(logits, full[:, :5], atol=1e-5, rtol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True)), "in place"
        assert all(c[:, :, 5:].abs().max() == 0 for c in caches_after), "wrote past position 4"
        caches = caches_after
        for position in range(5, 8):
            logits, *caches = wrapper(
                ids[:, position : position + 1], torch.tensor([position]), *caches
            )
            torch.testing.assert_close(logits[:, 0], full[:, position], atol=1e-5, rtol=1e-5)


def test_wrapper_ignores_unwritten_slots(tiny):
    """Garbage after the query's position changes nothing: the mask hides it."""
    wrapper = CacheWrapper(tiny("llama"), MAX_LENGTH)
    ids = tokens((1, 4), seed=2)
    zeros = [torch.zeros(wrapper.cache_shape(1)) for _ in range(4)]
    noise = [torch.randn(wrapper.cache_shape(1)) * 100 for _ in range(4)]
    with torch.no_grad():
        clean = wrapper(ids, torch.arange(4), *zeros)[0]
        dirty = wrapper(ids, torch.arange(4), *noise)[0]
    torch.testing.assert_close(clean, dirty, atol=1e-5, rtol=1e-5)


# --- the captured graph ---------------------------------------------------------------------


def test_capture_names_inputs_outputs_and_dims(llama_cache):
    graph, spec = llama_cache
    dims = {v.name: [str(d) for d in v.shape] for v in (*graph.graph.inputs, *graph.graph.outputs)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["cache_position"] == ["sequence"]
    assert dims["past.1.value"] == ["batch", "2", str(MAX_LENGTH), "16"]
    assert dims["logits"] == ["batch", "sequence", str(tiny_models.VOCAB)]
    assert dims["present.0.key"] == ["batch", "2", str(MAX_LENGTH), "16"]
    assert spec.batch is None and spec.max_length == MAX_LENGTH and spec.num_layers == 2
    assert spec.output_names[0] == "logits" and spec.dtype == torch.float32
    assert cache_spec_of(graph) == spec  # recoverable from the graph alone (save/load, passes)
    # weights and module paths read as in a plain capture of the model
    assert "model.layers.0.self_attn.q_proj.weight" in graph.graph.initializers
    assert "lm_head.weight" in graph.graph.initializers


def test_capture_leaves_the_model_as_it_was():
    """The wrapper is a fresh module (training mode); capturing through it must not switch the
    wrapped model's dropout on."""
    model = tiny_models.make("gpt2")  # dropout 0.1: train mode would change its output
    ids = tokens((2, 6))
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    _capture(model, batch=1, max_length=MAX_LENGTH)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, before)


def test_capture_traces_with_examples_where_the_model_is(monkeypatch):
    """A model on a GPU is traced with example ids, positions and caches on the GPU (on CPU
    examples the trace's eager call fails with a device mismatch). Without a GPU: a model on the
    meta device, and the tracer stubbed to report where its examples are."""
    import kompakt.lowering.from_torch as from_torch

    seen = {}

    def record(module, feeds, **kwargs):
        seen.update({name: t.device.type for name, t in feeds.items()})
        raise CaptureError("stop here")

    monkeypatch.setattr(from_torch, "capture_module", record)
    with torch.device("meta"):
        model = tiny_models.make("llama")
    with pytest.raises(CaptureError, match="stop here"):
        capture_with_cache(model, batch=1, max_length=MAX_LENGTH)
    assert seen and set(seen.values()) == {"meta"}, seen


@pytest.mark.gpu
def test_compile_of_a_cuda_model_with_kv_cache_generates_like_hugging_face():
    model = tiny_models.make("llama").cuda()
    prompt = tokens((1, 5)).cuda()
    cm = kompakt.compile(model, (prompt,), target="cpu", kv_cache=24, progress=False)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(cm.generate(prompt, max_new_tokens=6).to(want.device), want)


def test_cache_spec_of_a_graph_without_cache_is_none():
    assert cache_spec_of(tiny_models.linear_model(torch.ones(4, 4))) is None


@pytest.mark.parametrize("backend", ["reference", "onnxruntime"])
@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (3, 5)])
def test_captured_prompt_logits_equal_the_model(tiny, llama_cache, runs, backend, shape):
    _, spec = llama_cache
    run = _run(runs, backend)
    ids = tokens(shape, seed=3)
    feeds = {"input_ids": ids, "cache_position": torch.arange(shape[1])}
    feeds.update(spec.empty_caches(shape[0]))
    logits = run(feeds)[spec.output_names.index("logits")]
    want = tiny_models.reference_output(tiny("llama"), ids)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


# --- greedy generation against Hugging Face --------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "onnxruntime"])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_equals_hf_generate(tiny, llama_cache, runs, backend, batch):
    _, spec = llama_cache
    ids = tokens((batch, 6), seed=10 + batch)
    ours = generate(_run(runs, backend), spec, ids, NEW)
    assert torch.equal(ours, _hf_generate(tiny("llama"), ids))


def test_greedy_stops_and_pads_at_eos_like_hf(tiny, llama_cache, runs):
    model, (_, spec) = tiny("llama"), llama_cache
    ids = tokens((2, 6), seed=12)
    free = _hf_generate(model, ids)[:, 6:]
    # An end token that row 0 emits at its third step and row 1 never does: row 0 ends early
    # and is padded, row 1 runs on.
    eos = int(free[0, 2])
    assert eos not in free[1].tolist(), "pick another seed: both rows emit the token"
    want = _hf_generate(model, ids, eos_token_id=eos, pad_token_id=0)
    ours = generate(runs["reference"], spec, ids, NEW, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, want)
    assert ours[0, 9:].eq(0).all() and ours.shape[1] == 6 + NEW
    # Batch 1: generation stops at the end token.
    ours = generate(runs["reference"], spec, ids[:1], NEW, eos_token_id=[eos])
    assert ours.shape[1] == 6 + 3 and int(ours[0, -1]) == eos


def test_qwen2_static_batch_greedy_equals_hf(tiny):
    model = tiny("qwen2")
    graph, spec = _capture(model, batch=1, max_length=MAX_LENGTH, dynamic_batch=False)
    assert spec.batch == 1 and graph.graph.inputs[0].shape[0] == 1
    ids = tokens((1, 6), seed=4)
    run = make_backend("reference", graph).run
    assert torch.equal(generate(run, spec, ids, NEW), _hf_generate(model, ids))
    with pytest.raises(InputError, match="captured for batch 1"):
        generate(run, spec, tokens((2, 6)), NEW)


def test_fp16_greedy_equals_hf_generate():
    model = tiny_models.make("llama").half()
    graph, spec = _capture(model, batch=2, max_length=MAX_LENGTH)
    assert spec.dtype == torch.float16
    ids = tokens((2, 6), seed=5)
    ours = generate(make_backend("reference", graph).run, spec, ids, NEW)
    assert torch.equal(ours, _hf_generate(model, ids))


def test_generate_through_compile(tiny, llama_cache):
    """What CompiledModel.generate will do: the spec survives the pipeline."""
    graph, _ = llama_cache
    compiled = kompakt.compile(
        graph, target="cpu", backend="reference", progress=False, estimate_latency=False
    )
    spec = cache_spec_of(compiled.ir)
    ids = tokens((2, 6), seed=6)
    ours = generate(lambda feeds: list(compiled(**feeds)), spec, ids, NEW)
    assert torch.equal(ours, _hf_generate(tiny("llama"), ids))


def test_prompt_that_exactly_fills_the_cache(llama_cache, runs):
    _, spec = llama_cache
    ids = tokens((1, MAX_LENGTH - NEW + 1), seed=7)  # the last new token is never written
    assert generate(runs["reference"], spec, ids, NEW).shape == (1, MAX_LENGTH + 1)
    assert torch.equal(generate(runs["reference"], spec, ids, 0), ids)


# --- sampling -------------------------------------------------------------------------------


def test_sampling_is_reproducible_and_top_k_1_is_greedy(llama_cache, runs):
    _, spec = llama_cache
    run = runs["reference"]
    ids = tokens((2, 6), seed=8)
    first = generate(run, spec, ids, NEW, do_sample=True, seed=1, temperature=0.9)
    again = generate(run, spec, ids, NEW, do_sample=True, seed=1, temperature=0.9)
    other = generate(run, spec, ids, NEW, do_sample=True, seed=2, temperature=0.9)
    assert torch.equal(first, again) and not torch.equal(first, other)
    greedy = generate(run, spec, ids, NEW)
    assert torch.equal(generate(run, spec, ids, NEW, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(generate(run, spec, ids, NEW, do_sample=True, top_p=1e-6, seed=3), greedy)


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.6)]
)
def test_filters_match_hf_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, tiny_models.VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    want = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        want = TopKLogitsWarper(top_k)(None, want)
    if top_p < 1:
        want = TopPLogitsWarper(top_p)(None, want)
    torch.testing.assert_close(filter_logits(logits, temperature, top_k, top_p), want)


def test_samples_stay_inside_the_filters():
    """A fake backend with fixed probabilities [0.4, 0.3, 0.2, 0.1]: top_p=0.5 keeps the first
    two tokens (the dropped tail 0.1 + 0.2 stays within 1 - 0.5), top_k=3 the first three."""
    spec = CacheSpec(
        1, 1, 2, 64, None, torch.float32, 4, ("k", "v"), ("k2", "v2"), ("logits", "k2", "v2")
    )
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()

    def run(feeds):
        ids = feeds["input_ids"]
        return [logits.expand(*ids.shape, 4), feeds["k"], feeds["v"]]

    ids = torch.zeros((2, 1), dtype=torch.int64)
    drawn = generate(run, spec, ids, 60, do_sample=True, top_p=0.5, seed=0)[:, 1:]
    assert set(drawn.unique().tolist()) == {0, 1}
    drawn = generate(run, spec, ids, 60, do_sample=True, top_k=3, seed=0)[:, 1:]
    assert set(drawn.unique().tolist()) == {0, 1, 2}


# --- errors ---------------------------------------------------------------------------------


def test_bad_inputs_are_named(llama_cache, runs):
    _, spec = llama_cache
    run = runs["reference"]
    ids = tokens((1, 6))
    with pytest.raises(InputError, match="needs 25 cache slots.*max_length=24"):
        generate(run, spec, tokens((1, 18)), NEW)
    with pytest.raises(InputError, match="integer"):
        generate(run, spec, ids.float(), NEW)
    with pytest.raises(InputError, match="max_new_tokens"):
        generate(run, spec, ids, -1)
    with pytest.raises(InputError, match="temperature"):
        generate(run, spec, ids, NEW, do_sample=True, temperature=0)
    with pytest.raises(InputError, match="top_p"):
        generate(run, spec, ids, NEW, do_sample=True, top_p=0)


def test_wrapper_rejects_what_it_cannot_wrap(tiny):
    with pytest.raises(CaptureError, match="config"):
        CacheWrapper(torch.nn.Linear(2, 2), 8)
    with pytest.raises(CaptureError, match="max_position_embeddings"):
        CacheWrapper(tiny("llama"), 1000)
    wrapper = CacheWrapper(tiny("llama"), 8)
    with pytest.raises(CaptureError, match="expected 4 caches"):
        wrapper(tokens((1, 2)), torch.arange(2), torch.zeros(wrapper.cache_shape(1)))


def test_sliding_window_models_need_the_window_to_cover_the_cache():
    import transformers as hf

    config = hf.MistralConfig(
        vocab_size=tiny_models.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=16,
    )
    model = hf.MistralForCausalLM(config)
    with pytest.raises(CaptureError, match="window 16.*max_length must be <= 16"):
        CacheWrapper(model, 32)
    assert CacheWrapper(model, 16).max_length == 16


def test_compile_with_kv_cache_generates_like_hugging_face(tiny):
    """The user's path: compile(..., kv_cache=N) with a quantizing target, then cm.generate."""
    model = tiny("llama")
    prompt = torch.randint(
        0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3)
    )
    cm = kompakt.compile(model, (prompt,), target="cpu-w8", kv_cache=24, progress=False)
    got = cm.generate(prompt, max_new_tokens=6)
    assert got.shape == (2, 11) and torch.equal(got[:, :5], prompt)
    plain = kompakt.compile(model, (prompt,), target="cpu", kv_cache=24, progress=False)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain.generate(prompt, max_new_tokens=6), want)
    # w8 weights need not pick the same tokens as fp32 on a random model; the first usually is
    assert (got[:, 5] == want[:, 5]).float().mean() >= 0.5


def test_calibrated_compile_of_a_cache_graph(tiny):
    model = tiny("llama")
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randint(0, model.config.vocab_size, (2, 6), generator=g),) for _ in range(2)]
    cm = kompakt.compile(
        model, batches[0], target="cpu-w4", kv_cache=16, calibration=batches, progress=False
    )
    assert "gptq" in cm.pipeline
    assert cm.generate(batches[0][0], max_new_tokens=3).shape == (2, 9)


def test_generate_without_a_cache_graph_says_how(tiny):
    model = tiny("llama")
    prompt = torch.zeros(1, 4, dtype=torch.long)
    cm = kompakt.compile(model, (prompt,), target="cpu", progress=False)
    with pytest.raises(InputError, match="kv_cache"):
        cm.generate(prompt, max_new_tokens=2)
    with pytest.raises(kompakt.KompaktError, match="cache length"):
        kompakt.compile(model, (prompt,), target="cpu", kv_cache="long", progress=False)
