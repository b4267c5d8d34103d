"""CPU end to end: kompakt cpu-w4 vs torch eager fp32 vs ONNX Runtime fp32 vs ORT's own 4-bit
quantizer, in one run, on the same inputs.

    python benchmarks/cpu_e2e.py [--repeats N] [--quick]

Models:
- one Llama-shaped decoder layer (hidden 4096, MLP 11008, 32 heads) as a 1-layer LlamaModel with a
  small vocabulary (1024) so that the layer dominates, random init, batch 1, sequence 1 and 128;
- all-MiniLM-L6-v2 (real weights), batch 1 and 32.
ORT's quantizer is `MatMulNBitsQuantizer` (4 bits, block 128, asymmetric), run both with its default
accuracy level (float32 compute) and with accuracy_level=4 (int8 activations, the fast CPU path,
which kompakt's cpu-w4 also uses). Fidelity is the
max abs error relative to the output's scale (Llama) or the mean embedding cosine (MiniLM).
--quick shrinks the Llama layer (hidden 1024) for a smoke run.
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
import warnings

import onnx
import torch
import transformers as hf
from onnxruntime.quantization.matmul_nbits_quantizer import (
    DefaultWeightOnlyQuantConfig,
    MatMulNBitsQuantizer,
)

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


def llama_layer(hidden: int, mlp: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = hf.LlamaConfig(
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=1,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
    )
    return hf.LlamaModel(config).eval()


def ort_quantized(fp32: onnx.ModelProto, accuracy_level: int | None) -> onnx.ModelProto:
    # ORT 1.31's MatMulNBitsQuantizer drops its own accuracy_level argument (the nodes come out
    # without the attribute); passed through the config object it is honoured.
    config = DefaultWeightOnlyQuantConfig(
        block_size=128, is_symmetric=False, accuracy_level=accuracy_level
    )
    copy = onnx.ModelProto()
    copy.CopyFrom(fp32)  # the quantizer rewrites the proto it is given, in place
    quantizer = MatMulNBitsQuantizer(copy, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def bench_model(name, model, cases, repeats, score):
    """cases: list of (label, feeds). Returns table rows.

    torch is timed before any ONNX Runtime session exists, and each session is timed alone and
    dropped before the next: on a 2-core machine, idle sessions' spinning threads slow the others.
    """
    rows, reference, base = [], {}, {}
    with torch.no_grad():
        for label, feeds in cases:
            reference[label] = model(**feeds)[0]
            base[label] = median_ms(lambda f=feeds: model(**f), repeats)
            rows.append(
                [name, label, "torch eager fp32", f"{base[label]:.2f}", "1.00x", "reference"]
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = capture_module(model, cases[0][1])
    fp32_proto = _proto(captured)

    def measure(variant, run_fn, output_fn):
        for label, feeds in cases:
            t = median_ms(lambda f=feeds: run_fn(f), repeats)
            fidelity_text = score(reference[label], output_fn(feeds), feeds)
            rows.append(
                [name, label, variant, f"{t:.2f}", f"{base[label] / t:.2f}x", fidelity_text]
            )

    # Every peer model is produced before anything is timed, and each session is timed alone.
    peers = {
        "ORT fp32": fp32_proto,
        "ORT quantizer w4 (default)": ort_quantized(fp32_proto, None),
        "ORT quantizer w4 (accuracy_level=4)": ort_quantized(fp32_proto, 4),
    }
    gc.collect()
    for variant, proto in peers.items():
        session = ort_session(proto)
        measure(
            variant, lambda f, s=session: ort_runner(s, f)(), lambda f, s=session: ort_output(s, f)
        )
        del session
        gc.collect()
    del peers

    start = time.perf_counter()
    compiled = kompakt.compile(captured, target="cpu-w4", estimate_latency=False)
    compile_s = time.perf_counter() - start

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    measure("kompakt cpu-w4", lambda f: compiled(**f), lambda f: first(compiled(**f)))
    print(f"  {name}: kompakt cpu-w4 compile {compile_s:.1f} s", flush=True)
    return rows


def _proto(model) -> onnx.ModelProto:
    import onnx_ir as ir

    proto = ir.to_proto(model)
    proto.ir_version = IR_VERSION
    return proto


def relative_error(reference, output, feeds) -> str:
    return f"rel err {float((output - reference).abs().max() / reference.abs().max()):.4f}"


def embedding_cosine(reference, output, feeds) -> str:
    mask = feeds["attention_mask"]
    return f"cosine {fidelity(mean_pool(reference, mask), mean_pool(output, mask)).mean_cosine:.4f}"


def main() -> None:
    # onnxruntime.quantization turns the root logger to INFO on import; keep the output readable.
    logging.getLogger().setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--quick", action="store_true", help="small Llama layer (hidden 1024) for a smoke run"
    )
    args = parser.parse_args()
    hidden, mlp = (1024, 2816) if args.quick else (4096, 11008)
    print(f"cpu_e2e on {machine()}, {time.strftime('%Y-%m-%d')}", flush=True)

    rows = []
    layer = llama_layer(hidden, mlp)
    gen = torch.Generator().manual_seed(0)
    cases = [
        (f"b1 s{s}", {"input_ids": torch.randint(0, 1024, (1, s), generator=gen)}) for s in (1, 128)
    ]
    rows += bench_model(f"Llama layer h{hidden}", layer, cases, args.repeats, relative_error)
    del layer

    minilm, tokenizer = load_minilm()
    cases = []
    for batch in (1, 32):
        enc = tokenizer((list(SENTENCES) * 2)[:batch], padding=True, return_tensors="pt")
        cases.append(
            (f"b{batch}", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        )
    rows += bench_model("MiniLM-L6", minilm, cases, args.repeats, embedding_cosine)

    print()
    print(
        markdown_table(
            ["model", "shape", "variant", "ms (median)", "vs torch fp32", "fidelity"], rows
        )
    )


if __name__ == "__main__":
    main()
