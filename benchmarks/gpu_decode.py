"""GPU decode: tokens/s of a Llama-2-7B-shaped model at batch 1 and 8, torch vs kompakt.

    python -m benchmarks.gpu_decode [--quick] [--layers N] [--repeats N] [--out DIR]

Model: `LlamaForCausalLM` with Llama-2-7B's shape (hidden 4096, MLP 11008, 32 layers, 32 heads,
vocabulary 32000), random init, fp16, built on the GPU; --layers keeps fewer layers for a quick
run (its tokens/s are then not the 7B model's). Prompt: 32 random tokens; 128 new tokens, greedy,
never stopping early (min_new_tokens). Only decode is timed: a stopping criterion stamps the time
(after a CUDA sync) at which each new token comes out, and decode tokens/s is
batch x 127 / (last stamp - first stamp), the first token being the prefill's.
Rows, all on the same model and prompts:
- torch eager fp16: HF `generate` with its static cache, automatic compilation disabled;
- torch.compile fp16: the same with HF compiling the decode step, CompileConfig(mode=
  "reduce-overhead") (CUDA graphs); the warm-up call pays the compile;
- kompakt fp16 and kompakt -w4, through `CompiledModel.generate` when the build has it.
Each row: the median of --repeats timed calls after one warm-up call.
Output: a markdown table on stdout; gpu_decode.json and gpu_decode.md under --out (default $OUT,
else ./bench-out), with the device, versions and date.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from benchmarks.gpu_kernels import (
    default_out_dir,
    environment,
    markdown_table,
    require_cuda,
    write_outputs,
)

DEVICE = "cuda"
PROMPT, NEW_TOKENS = 32, 128
LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)
VARIANTS = ("eager", "compile", "kompakt")
TORCH_ROWS = (  # (row name, torch.compile mode or None for eager, --variants key)
    ("torch eager fp16", None, "eager"),
    ("torch.compile fp16", "reduce-overhead", "compile"),
)
NOT_IMPLEMENTED = "kompakt generate(): not implemented in this build"


# ---- arithmetic (unit-tested with made-up timings) ----------------------------------------------
def decode_tokens_per_s(stamps: list[float], batch: int) -> float:
    """Tokens/s between the first new token (the prefill's) and the last, over the batch."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        raise ValueError(f"need two increasing time stamps, got {stamps}")
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_tokens_per_s_from_totals(
    long_s: float, short_s: float, long_tokens: int, short_tokens: int, batch: int
) -> float:
    """Decode tokens/s from two whole generate calls that differ only in new tokens: the
    difference removes the prefill (used where no per-token hook is available)."""
    if long_tokens <= short_tokens or long_s <= short_s:
        raise ValueError("the longer call must produce more tokens and take longer")
    return batch * (long_tokens - short_tokens) / (long_s - short_s)


def ms_per_step(tokens_per_s: float, batch: int) -> float:
    return 1e3 * batch / tokens_per_s


# ---- torch rows ----------------------------------------------------------------------------------
def step_clock():
    """A transformers StoppingCriteria that records when each new token comes out, never stops."""
    from transformers import StoppingCriteria

    class StepClock(StoppingCriteria):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            if input_ids.is_cuda:
                torch.cuda.synchronize(input_ids.device)
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StepClock()


def hf_decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, compile_mode=None):
    """One HF generate call with a static cache; compile_mode None keeps it eager."""
    from transformers import CompileConfig, StoppingCriteriaList

    clock = step_clock()
    kwargs = dict(
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # random weights may emit EOS early; every row decodes as many
        do_sample=False,
        pad_token_id=0,
        cache_implementation="static",
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    if compile_mode is None:
        kwargs["disable_compile"] = True  # HF compiles static-cache decoding on GPU by default
    else:
        kwargs["compile_config"] = CompileConfig(mode=compile_mode)
    with torch.no_grad():
        out = model.generate(prompt, **kwargs)
    if out.shape[1] != prompt.shape[1] + new_tokens or len(clock.stamps) != new_tokens:
        raise RuntimeError(
            f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}"
        )
    return decode_tokens_per_s(clock.stamps, prompt.shape[0])


def llama(layers: int, device: str = DEVICE, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": layers, **overrides})
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16 on the device: no fp32 copy on the host
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def median_of(fn, repeats: int) -> float:
    fn()  # warm-up: compiles, captures CUDA graphs, fills the allocator
    return statistics.median(fn() for _ in range(repeats))


# ---- kompakt rows --------------------------------------------------------------------------------
def gpu_preset(device_name: str) -> str:
    from kompakt.targets.hardware import PRESETS

    name = device_name.lower().replace(" ", "")
    gpus = [key for key, spec in PRESETS.items() if spec.kind == "gpu" and key in name]
    return gpus[0] if gpus else "h100"


def generate_seconds(compiled, prompt: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled.generate(prompt, max_new_tokens=new_tokens)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def kompakt_rows(model, prompts: dict, new_tokens: int, repeats: int, preset: str):
    """Rows for kompakt fp16 and -w4, or the reason there are none. `CompiledModel.generate`
    has no per-token hook: decode time comes from two call lengths."""
    from kompakt.runtime.compiled_model import CompiledModel

    if not hasattr(CompiledModel, "generate"):
        return NOT_IMPLEMENTED
    import kompakt

    rows = []
    for variant, target in (("kompakt fp16", preset), ("kompakt w4", f"{preset}-w4")):
        try:
            example = {"input_ids": next(iter(prompts.values()))}
            compiled = kompakt.compile(
                model,
                example,
                target=target,
                backend="triton",
                estimate_latency=False,
                kv_cache=PROMPT + new_tokens,  # static cache: prefill, then one token a step
            )
            for batch, p in prompts.items():
                # The triton backend captures a CUDA graph the second time it meets a shape:
                # one untimed call here and median_of's warm-up, so the prompt's prefill graph
                # is not captured inside a timed call.
                generate_seconds(compiled, p, 2)
                long_s = median_of(
                    lambda c=compiled, p=p: generate_seconds(c, p, new_tokens), repeats
                )
                short_s = median_of(lambda c=compiled, p=p: generate_seconds(c, p, 1), repeats)
                tps = decode_tokens_per_s_from_totals(long_s, short_s, new_tokens, 1, batch)
                rows.append({"batch": batch, "variant": variant, "tokens_per_s": tps})
        except Exception as err:  # a failing kompakt path is a row with its reason, not a crash
            error = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append({"batch": "all", "variant": variant, "error": error})
    return rows


def render(rows: list[dict], env: dict, layers: int, notes: list[str]) -> str:
    eager = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "torch eager fp16"}
    table = []
    for r in rows:
        tps = r.get("tokens_per_s")
        base = eager.get(r["batch"])
        table.append(
            [str(r["batch"]), r["variant"]]
            + ([f"{tps:.1f}", f"{ms_per_step(tps, r['batch']):.2f}"] if tps else ["", ""])
            + [f"{tps / base:.2f}x" if tps and base else r.get("error", "")]
        )
    model = "Llama-2-7B shape" + ("" if layers == 32 else f", {layers} of 32 layers")
    lines = [
        f"gpu_decode on {env.get('device')} ({env.get('arch')}), torch {env['torch']}, "
        f"transformers {env.get('transformers')}, {env['date']}",
        f"{model}, fp16, prompt {PROMPT}, {NEW_TOKENS} new tokens, greedy; decode only",
        "",
        markdown_table(["batch", "variant", "decode tok/s", "ms/step", "vs eager"], table),
    ]
    return "\n".join(lines + (["", "Notes:", *[f"- {n}" for n in notes]] if notes else []))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, 1 timed call per row")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (2)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="of " + ",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else ./bench-out")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda("gpu_decode")
    import transformers

    layers = args.layers or (4 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    env = environment() | {"transformers": transformers.__version__}
    print(f"gpu_decode on {env['device']}, {layers} layers, {env['date']}", flush=True)
    model = llama(layers, DEVICE)
    gen = torch.Generator().manual_seed(0)
    vocab = LLAMA2_7B["vocab_size"]
    prompts = {
        int(b): torch.randint(3, vocab, (int(b), PROMPT), generator=gen).to(DEVICE)
        for b in args.batches.split(",")
    }
    rows, notes = [], []
    for variant, mode, key in TORCH_ROWS:
        for batch, prompt in prompts.items() if key in variants else ():
            start = time.perf_counter()
            row = {"batch": batch, "variant": variant}
            try:
                run = partial(hf_decode_tokens_per_s, model, prompt, NEW_TOKENS, mode)
                row["tokens_per_s"] = median_of(run, repeats)
            except Exception as err:  # e.g. a compile failure: reported in the table
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print(f"  {variant} b{batch}: {row} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "kompakt" in variants:
        result = kompakt_rows(model, prompts, NEW_TOKENS, repeats, gpu_preset(env["device"]))
        if isinstance(result, str):
            print(result)
            notes.append(result + "; kompakt rows skipped")
        else:
            rows += result
    markdown = render(rows, env, layers, notes)
    print("\n" + markdown)
    payload = {"environment": env, "layers": layers, "prompt": PROMPT, "new_tokens": NEW_TOKENS}
    payload |= {"repeats": repeats, "rows": rows, "notes": notes}
    write_outputs(args.out or default_out_dir(), "gpu_decode", payload, markdown)


if __name__ == "__main__":
    main()
