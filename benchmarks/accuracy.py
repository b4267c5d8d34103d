"""Accuracy harness: quantization method x bits -> perplexity, embedding cosine, bytes.

    python -m benchmarks.accuracy [--windows N]

Models (both with real trained weights, both installed with the project):
- kompakt's tiny byte-level Llama trained on the King James Bible (examples/train_tiny_lm.py):
  held-out byte perplexity, convention in kompakt.eval.perplexity (256-byte windows, stride 256);
  calibration on 64 KiB of the training split;
- all-MiniLM-L6-v2: mean cosine of mean-pooled sentence embeddings vs fp32 on
  kompakt.eval.embeddings.SENTENCES; calibration on kompakt.eval.texts.CALIBRATION_TEXTS.
Quantized models run on the reference runtime (float32 arithmetic), so the table shows what the
weights lose, not ONNX Runtime's int8-activation kernels. fp32 and RTN are in the same run.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import kompakt
from benchmarks.common import machine, markdown_table
from kompakt.data import byte_batches, text_batches
from kompakt.eval.embeddings import SENTENCES, fidelity, mean_pool
from kompakt.eval.perplexity import byte_windows, perplexity
from kompakt.eval.texts import CALIBRATION_TEXTS
from kompakt.lowering import capture_module
from kompakt.models import load_minilm, load_tiny_lm, tiny_lm_texts

W8 = "quantize-weights{bits=8,group-size=-1,symmetric=true}"
W8A8 = "quantize-activations{dynamic=true}"
ROWS: list[tuple[str, str, str]] = [
    # (scheme, method, pipeline after canonicalize)
    ("w8 per-channel", "RTN", "quantize-weights{bits=8,group-size=-1,symmetric=true}"),
    ("w8 per-channel", "GPTQ", "gptq{bits=8,group-size=-1,symmetric=true}"),
    ("w8 per-channel", "AWQ", "awq{bits=8,group-size=-1,symmetric=true}"),
    ("w8 per-channel", "LLM.int8() split (weights)", "outlier-split{kind=activation}"),
    ("W8A8 dynamic per-token", "RTN weights, no smoothing", f"{W8},{W8A8}"),
    ("W8A8 dynamic per-token", "SmoothQuant", f"smoothquant,{W8},{W8A8}"),
    ("W8A8 dynamic per-token", "LLM.int8() split", f"outlier-split{{kind=activation}},{W8A8}"),
    ("W8A8 static per-tensor", "RTN weights, no smoothing", f"{W8},quantize-activations"),
    ("W8A8 static per-tensor", "SmoothQuant α 0.5", f"smoothquant,{W8},quantize-activations"),
    (
        "W8A8 static per-tensor",
        "SmoothQuant α 0.8 (`-w8a8-static`)",
        f"smoothquant{{alpha=0.8}},{W8},quantize-activations",
    ),
    ("fp8 E4M3 static", "per-channel weight scales", "fp8"),
    ("w4.5 mixed (4/8)", "HAWQ-style + GPTQ", "mixed-precision{average-bits=4.5}"),
    ("w4 g128", "RTN", "quantize-weights{bits=4,group-size=128}"),
    ("w4 g128", "GPTQ", "gptq{bits=4,group-size=128}"),
    ("w4 g128", "AWQ", "awq{bits=4,group-size=128}"),
    ("w4 g128", "RTN + LoRC r8", "keep-float-weights,quantize-weights,lowrank-compensation"),
    ("w4 g16", "SpQR (1% outliers)", "outlier-split{kind=weight,bits=4}"),
    ("w4", "codebook (SqueezeLLM)", "codebook{bits=4}"),
    ("w3 g128", "RTN", "quantize-weights{bits=3,group-size=128}"),
    ("w3 g128", "GPTQ", "gptq{bits=3,group-size=128}"),
    ("w3 g128", "AWQ", "awq{bits=3,group-size=128}"),
    (
        "w3 g128",
        "RTN + LoRC r8",
        "keep-float-weights,quantize-weights{bits=3},lowrank-compensation",
    ),
    ("w3", "codebook (SqueezeLLM)", "codebook{bits=3}"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=None, help="held-out windows (default: all)")
    parser.add_argument(
        "--only", default=None, help="rows whose scheme or method contains this text (e.g. W8A8)"
    )
    args = parser.parse_args()
    print(f"accuracy on {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)

    lm = load_tiny_lm()
    heldout, calibration_text = tiny_lm_texts()
    lm_example = (byte_windows(heldout, 256, 2),)
    lm_calibration = byte_batches(calibration_text, 256, 8)
    minilm, tokenizer = load_minilm()
    enc = tokenizer(list(SENTENCES), padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    minilm_calibration = text_batches(list(CALIBRATION_TEXTS), tokenizer, batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm_ir = capture_module(lm, lm_example)
        minilm_ir = capture_module(minilm, inputs)
    with torch.no_grad():
        reference = mean_pool(minilm(**inputs).last_hidden_state, inputs["attention_mask"])
    fp32_ppl = perplexity(lambda ids: lm(input_ids=ids).logits, heldout, max_windows=args.windows)
    fp32_bytes = (
        kompakt.compile(lm_ir, target="cpu", backend="reference", estimate_latency=False)
        .report()
        .size_after.bytes
    )
    rows = [["fp32", "-", f"{fp32_ppl:.4f}", "1.00000", f"{fp32_bytes / 1e6:.2f}"]]
    print(f"  fp32: ppl {fp32_ppl:.4f}", flush=True)

    for scheme, method, passes in ROWS:
        if args.only and args.only not in scheme and args.only not in method:
            continue
        pipeline = f"canonicalize,{passes}"
        calibrated = any(p.uses_calibration for p in kompakt.Pipeline.parse(pipeline).passes)
        start = time.perf_counter()
        lm_q = kompakt.compile(
            lm_ir,
            pipeline=pipeline,
            backend="reference",
            calibration=lm_calibration if calibrated else None,
            estimate_latency=False,
            progress=False,
        )
        ppl = perplexity(lambda ids, m=lm_q: m(ids), heldout, max_windows=args.windows)
        mini_q = kompakt.compile(
            minilm_ir,
            pipeline=pipeline,
            backend="reference",
            calibration=minilm_calibration if calibrated else None,
            estimate_latency=False,
            progress=False,
        )
        cosine = fidelity(
            reference, mean_pool(mini_q(**inputs)[0], inputs["attention_mask"])
        ).mean_cosine
        size = lm_q.report().size_after.bytes
        rows.append([scheme, method, f"{ppl:.4f}", f"{cosine:.5f}", f"{size / 1e6:.2f}"])
        print(
            f"  {scheme} {method}: ppl {ppl:.4f} cosine {cosine:.5f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )

    print()
    print(
        markdown_table(
            ["scheme", "method", "tiny LM held-out ppl", "MiniLM cosine", "tiny LM weights MB"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
