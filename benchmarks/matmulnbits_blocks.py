"""Why 8-bit weights use 32-element MatMulNBits blocks: fidelity and speed per kernel block.

    python -m benchmarks.matmulnbits_blocks [--repeats N]

all-MiniLM-L6-v2, cpu-w8 (per-channel int8 weights), lowered with `block_size_8bit` in
{16, 32, 64, 128} at accuracy level 4, next to ORT fp32 in the same run. The weights are the same
in every row; only the block over which ORT quantizes activations to int8 changes.
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings

import onnx_ir as ir
import torch

import kompakt
from benchmarks.common import (
    machine,
    markdown_table,
    median_ms,
    ort_output,
    ort_runner,
    ort_session,
)
from kompakt.eval.embeddings import SENTENCES, fidelity, mean_pool
from kompakt.ir.builder import IR_VERSION
from kompakt.lowering import capture_module
from kompakt.models import load_minilm
from kompakt.passes.base import CompileContext
from kompakt.passes.lower.lower_to_matmulnbits import LowerToMatMulNBits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    print(f"matmulnbits_blocks on {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)
    model, tokenizer = load_minilm()
    enc = tokenizer(list(SENTENCES) * 2, padding=True, return_tensors="pt")
    feeds32 = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    feeds1 = {k: v[:1] for k, v in feeds32.items()}
    mask = feeds32["attention_mask"]
    with torch.no_grad():
        reference = mean_pool(model(**feeds32).last_hidden_state, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_module(model, feeds32)
    quantized = kompakt.compile(
        captured, target="cpu-w8", backend="reference", estimate_latency=False
    ).ir

    variants = {"ORT fp32": captured}
    for block in (16, 32, 64, 128):
        lowered = quantized.clone()
        LowerToMatMulNBits(accuracy_level=4, block_size_8bit=block).run(
            lowered, CompileContext(progress=False)
        )
        variants[f"w8, block {block}"] = lowered
    rows = []
    for name, variant in variants.items():
        proto = ir.to_proto(variant)
        proto.ir_version = IR_VERSION
        session = ort_session(proto)
        score = fidelity(reference, mean_pool(ort_output(session, feeds32), mask))
        t1 = median_ms(ort_runner(session, feeds1), args.repeats)
        t32 = median_ms(ort_runner(session, feeds32), max(5, args.repeats // 4))
        rows.append([name, f"{score.mean_cosine:.5f}", f"{t1:.2f}", f"{t32:.2f}"])
        del session
        gc.collect()
    print(markdown_table(["variant", "cosine vs torch fp32", "batch 1 ms", "batch 32 ms"], rows))


if __name__ == "__main__":
    main()
