"""GPU kernels: kompakt's W4A16 g128 dequant-matmul vs cuBLAS fp16 and torch's own int4 kernel.

    python -m benchmarks.gpu_kernels [--quick] [--reps N] [--out DIR] [--cuda-gemv-m 1,16]

K = N in {4096, 8192, 16384}, M in {1, 2, 4, ..., 128}, fp16 activations, a random 4-bit weight
(group 128, asymmetric). At each shape every kernel's output is first checked against
`dequant_matmul_reference` (a kernel that fails is reported, not timed), then timed:
- median of --reps CUDA-event timings; before each one L2 is flushed by writing 256 MiB (the
  H100/H200 L2 is 50 MiB and the 4096^2 int4 weight, 8 MiB, would otherwise be read from it), and
  a ~0.1 ms GPU spin lets the CPU queue the call ahead, so the time is the GPU's, as under the
  runtime's CUDA graphs, not Python's launch overhead;
- bandwidth: the bytes the call must move (packed weight, scales, zeros, x, y: `spec.cost`) per
  second, as a fraction of a 1 GiB device-to-device copy timed in the same run;
- peers: cuBLAS fp16 `torch.matmul(x, W.t())` (W [N, K], as nn.Linear holds it), and torch's int4
  kernel (tinygemm) `aten._weight_int4pack_mm`, which on CUDA takes bf16 activations only;
- kompakt's CUDA C GEMV (kompakt.codegen.cuda_gemv) when present, at the M of --cuda-gemv-m; its
  configs are built (nvcc, ~1 min each) in parallel before anything is timed.
The issue's targets are printed pass/fail for each kompakt kernel and for the faster of the two.
Output: a markdown table on stdout; gpu_kernels.json and gpu_kernels.md under --out (default
$OUT, else ./bench-out). The helpers here are shared with benchmarks/gpu_decode.py.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kompakt.codegen.autotune import L2_FLUSH_BYTES, cuda_median_seconds
from kompakt.codegen.dequant_matmul import PackedWeight, cost, dequant_matmul_reference, unpack

DEVICE = "cuda"
GROUP = 128
SIZES, QUICK_SIZES = (4096, 8192, 16384), (4096, 16384)
MS, QUICK_MS = (1, 2, 4, 8, 16, 32, 64, 128), (1, 4, 16, 64)
COPY_BYTES = 2**30
TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2}  # max |y - ref| / max |ref|; bf16 x has 8 mantissa bits

TARGETS = (  # (issue #4's words, threshold, what is compared on which rows, format)
    ("≥ 75% of copy bandwidth at M = 1, K = N ≥ 8192", 0.75, "copy", "{:.0%}"),
    ("≥ 2.5x cuBLAS fp16 at 16384², M = 1", 2.5, "fp16_big", "{:.2f}x"),
    ("≥ 1.0x torch int4 at M = 1", 1.0, "int4", "{:.2f}x"),
    ("≥ 2x cuBLAS fp16 for every M ≤ 16", 2.0, "fp16_small", "{:.2f}x"),
)


# ---- shared with gpu_decode.py ----------------------------------------------------------------
def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            f"{script}: a CUDA GPU is needed and none is visible (torch.cuda.is_available() is "
            "False); run it on a GPU machine"
        )


def default_out_dir() -> Path:
    return Path(os.environ.get("OUT") or "bench-out")


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = None
    info = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__}
    info |= {"triton": triton_version, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info |= {"device": torch.cuda.get_device_name(), "arch": f"sm_{major}{minor}"}
    return info


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_outputs(out: Path, stem: str, payload: dict, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(f"\nwrote {out / stem}.json and .md")


# ---- arithmetic (unit-tested with made-up timings) ----------------------------------------------
def bandwidth(nbytes: float, ms: float) -> float:
    """Bytes per second."""
    return nbytes / (ms * 1e-3)


def fraction_of_copy(nbytes: float, ms: float | None, copy_bytes_per_s: float) -> float | None:
    return None if ms is None else bandwidth(nbytes, ms) / copy_bytes_per_s


def speedup(baseline_ms: float | None, ms: float | None) -> float | None:
    return None if baseline_ms is None or ms is None else baseline_ms / ms


def kompakt_ms(row: dict, kernel: str) -> float | None:
    """The row's time for "triton", "cuda_gemv", or "best" (the faster of those measured)."""
    if kernel != "best":
        return row.get(f"{kernel}_ms")
    times = [t for t in (row.get("triton_ms"), row.get("cuda_gemv_ms")) if t is not None]
    return min(times) if times else None


def _metric(row: dict, what: str, kernel: str, copy_bytes_per_s: float) -> float | None:
    ms = kompakt_ms(row, kernel)
    if what == "copy" and row["m"] == 1 and row["k"] >= 8192:
        return fraction_of_copy(row["bytes"], ms, copy_bytes_per_s)
    if what == "fp16_big" and row["m"] == 1 and row["k"] == 16384:
        return speedup(row.get("fp16_ms"), ms)
    if what == "int4" and row["m"] == 1:
        return speedup(row.get("int4_ms"), ms)
    if what == "fp16_small" and row["m"] <= 16:
        return speedup(row.get("fp16_ms"), ms)
    return None


def evaluate_targets(rows: list[dict], kernel: str, copy_bytes_per_s: float) -> list[dict]:
    """Each target's worst case over the rows it covers: pass, fail, or n/a (nothing measured)."""
    results = []
    for words, threshold, what, fmt in TARGETS:
        cases = [(_metric(r, what, kernel, copy_bytes_per_s), r) for r in rows]
        cases = [(v, r) for v, r in cases if v is not None]
        result = {"target": words, "kernel": kernel, "status": "n/a", "worst": None, "at": None}
        if cases:
            value, row = min(cases, key=lambda c: c[0])
            status = "pass" if value >= threshold else "fail"
            result |= {"status": status, "worst": value, "at": f"K=N={row['k']} M={row['m']}"}
            result["text"] = fmt.format(value)
        results.append(result)
    return results


# ---- torch's int4 kernel (tinygemm) --------------------------------------------------------------
def nibbles(packed: PackedWeight) -> torch.Tensor:
    """The stored 4-bit values (0..15) as int32 [K, N]."""
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=packed.qweight.device)
    q = (packed.qweight.unsqueeze(1) >> shifts.reshape(1, 8, 1)) & 0xF
    return q.reshape(-1, packed.n)[: packed.k]


def tinygemm_weight(q: torch.Tensor, form: str) -> torch.Tensor:
    """q [K, N] (0..15) as `_convert_weight_to_int4pack` takes it: "uint8" [N, K/2] (torch >= 2.5;
    k = 2j in the high nibble of byte j, k = 2j + 1 in the low one) or "int32" [N, K] (older)."""
    qt = q.t().contiguous()
    if form == "int32":
        return qt.to(torch.int32)
    return ((qt[:, 0::2] << 4) | qt[:, 1::2]).to(torch.uint8)


def tinygemm_scales_zeros(packed: PackedWeight, dtype=torch.bfloat16) -> torch.Tensor:
    """[G, N, 2] (scale, zero) for tinygemm, which computes w = (q - 8) * scale + zero; ours is
    w = (q - z) * scale, so its zero is (8 - z) * scale."""
    scale, zero = packed.scales.float(), packed.zeros.float()
    return torch.stack([scale, (8 - zero) * scale], dim=-1).to(dtype).contiguous()


def torch_int4(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(packed weight, scales_and_zeros, input form); raises with both forms' errors."""
    q, errors = nibbles(packed), []
    for form in ("uint8", "int32"):
        try:  # innerKTiles 8: 16-byte loads, what torchao and gpt-fast use
            weight = torch.ops.aten._convert_weight_to_int4pack(tinygemm_weight(q, form), 8)
            return weight, tinygemm_scales_zeros(packed), form
        except (RuntimeError, AttributeError) as err:
            errors.append(f"{form}: {str(err).splitlines()[0][:120]}")
    raise RuntimeError("; ".join(errors))


# ---- measuring ------------------------------------------------------------------------------------
def random_packed(k: int, n: int, device: str, seed: int = 0) -> PackedWeight:
    """A random 4-bit g128 weight built on the device: any int32 word is 8 valid nibbles."""
    gen = torch.Generator(device).manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31, (k // 8, n), generator=gen, device=device)
    groups = k // GROUP
    scales = (torch.rand(groups, n, generator=gen, device=device) * 0.01 + 0.005).half()
    zeros = (torch.rand(groups, n, generator=gen, device=device) * 3 + 6).half()
    return PackedWeight(qweight.to(torch.int32), scales, zeros, 4, GROUP, k, n)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    return float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def cuda_median_ms(fn, reps: int, flush: torch.Tensor | None, warmup: int = 5) -> float:
    """Median CUDA-event time of ``fn()`` in ms; L2 flushed and the GPU spun before each call
    (the autotuner's own timer, so tuned choices and these tables measure the same thing)."""
    return 1e3 * cuda_median_seconds(fn, reps, flush, warmup)


def copy_bandwidth(reps: int) -> float:
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device=DEVICE).fill_(1)
    dst = torch.empty_like(src)
    return bandwidth(2 * COPY_BYTES, cuda_median_ms(lambda: dst.copy_(src), reps, None))


def build_cuda_gemv(sizes, ms, arch: str) -> dict:
    """Builds every config the run needs, in parallel; returns {config: error text}."""
    from kompakt.codegen.cuda_gemv import choose_config, load

    configs = sorted({choose_config(m, n, n, arch, GROUP) for n in sizes for m in ms}, key=str)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(len(configs), os.cpu_count() or 2, 8))) as pool:
        futures = [(c, pool.submit(load, c)) for c in configs]
    failed = {c: str(f.exception())[:300] for c, f in futures if f.exception() is not None}
    print(f"built {len(configs)} CUDA C GEMV configs in {time.perf_counter() - start:.0f} s")
    return failed


def bench_shape(m: int, packed: PackedWeight, kernels: dict, reps: int, flush) -> dict:
    """kernels: name -> (fn(x) -> y, the dtype fn takes x in). Each is checked, then timed."""
    x = torch.randn(m, packed.k, dtype=torch.float16, device=DEVICE)
    row = {"k": packed.k, "m": m, "bytes": cost(m, packed.n, packed.k, GROUP, 4, 2)[1]}
    row["notes"] = []
    ref = dequant_matmul_reference(x, packed)
    for name, (fn, dtype) in kernels.items():
        xi = x.to(dtype)
        try:
            err = relative_error(fn(xi), ref)
        except Exception as e:  # a kernel that cannot run here is reported, not fatal
            row["notes"].append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            continue
        row[f"{name}_err"] = err
        if err > TOLERANCE["bf16" if dtype == torch.bfloat16 else "fp16"]:
            row["notes"].append(f"{name}: WRONG (rel err {err:.3g}), not timed")
            continue
        row[f"{name}_ms"] = cuda_median_ms(lambda f=fn, a=xi: f(a), reps, flush)
    return row


def render(rows: list[dict], targets: list[dict], env: dict, copy_bps: float, notes) -> str:
    def num(v, fmt="{:.1f}", scale=1e3):  # times are kept in ms and shown in µs
        return "" if v is None else fmt.format(v * scale)

    header = ["K=N", "M", "triton µs", "CUDA C µs", "cuBLAS fp16 µs", "torch int4 µs (bf16)"]
    header += ["best: % copy BW", "best vs fp16", "best vs int4"]
    table = []
    for r in rows:
        best = kompakt_ms(r, "best")
        times = [num(r.get(f"{k}_ms")) for k in ("triton", "cuda_gemv", "fp16", "int4")]
        table.append(
            [str(r["k"]), str(r["m"]), *times]
            + [num(fraction_of_copy(r["bytes"], best, copy_bps), "{:.0%}", 1)]
            + [num(speedup(r.get(f"{peer}_ms"), best), "{:.2f}x", 1) for peer in ("fp16", "int4")]
        )
    lines = [
        f"gpu_kernels on {env.get('device')} ({env.get('arch')}), torch {env['torch']}, "
        f"triton {env['triton']}, {env['date']}; copy bandwidth {copy_bps / 1e9:.0f} GB/s",
        "",
        markdown_table(header, table),
        "",
        "Targets (issue #4):",
    ]
    for t in targets:
        where = f" (worst {t['text']} at {t['at']})" if t["worst"] is not None else ""
        lines.append(f"- [{t['status'].upper()}] {t['kernel']}: {t['target']}{where}")
    notes = [f"- {n}" for n in notes]
    notes += [f"- K=N={r['k']} M={r['m']}: {n}" for r in rows for n in r["notes"]]
    return "\n".join(lines + (["", "Notes:", *notes] if notes else []))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K=N 4096 and 16384, M 1/4/16/64")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per kernel (50)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else ./bench-out")
    parser.add_argument(
        "--cuda-gemv-m",
        default=None,
        help="M values for the CUDA C GEMV ('' = skip; default 1,16: one build per (M, K))",
    )
    return parser.parse_args(argv)


def peers_for(packed: PackedWeight, notes: list[str]) -> dict:
    """cuBLAS fp16 on the same weight dequantized ([N, K], nn.Linear's layout), torch int4."""
    w16 = unpack(packed).half().t().contiguous()
    peers = {"fp16": (lambda x: torch.matmul(x, w16.t()), torch.float16)}
    try:
        int4 = torch.ops.aten._weight_int4pack_mm
        qw, sz, form = torch_int4(packed)
    except (RuntimeError, AttributeError) as err:
        notes.append(f"K=N={packed.k}: torch int4 column left empty: {err}")
        return peers
    notes.append(f"K=N={packed.k}: torch int4 packed from its {form} input form")
    peers["int4"] = (lambda x: int4(x, qw, GROUP, sz), torch.bfloat16)
    return peers


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda("gpu_kernels")
    from kompakt.codegen.dequant_matmul.kernel import launch_dequant_matmul
    from kompakt.codegen.devices import tuning_arch

    sizes, ms = (QUICK_SIZES, QUICK_MS) if args.quick else (SIZES, MS)
    reps = args.reps or (20 if args.quick else 50)
    gemv_m = args.cuda_gemv_m if args.cuda_gemv_m is not None else ("1" if args.quick else "1,16")
    gemv_m = [int(v) for v in gemv_m.split(",") if v.strip()]
    env, notes = environment(), []
    print(f"gpu_kernels on {env['device']}, {env['date']}", flush=True)
    copy_bps = copy_bandwidth(reps)
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=DEVICE)
    gemv = None
    if gemv_m:
        try:
            from kompakt.codegen.cuda_gemv import launch_cuda_gemv
        except ImportError as err:
            notes.append(f"CUDA C GEMV not measured: {err}")
        else:
            arch = tuning_arch(torch.device("cuda"))
            failed = build_cuda_gemv(sizes, gemv_m, arch)
            notes += [f"CUDA C GEMV build failed for {c}: {e}" for c, e in failed.items()]
            gemv = None if failed else launch_cuda_gemv
    rows = []
    for size in sizes:
        packed = random_packed(size, size, DEVICE)
        peers = peers_for(packed, notes)
        for m in ms:
            kernels = {"triton": (lambda x, p=packed: launch_dequant_matmul(x, p), torch.float16)}
            if gemv is not None and m in gemv_m:
                kernels["cuda_gemv"] = (lambda x, p=packed: gemv(x, p), torch.float16)
            rows.append(bench_shape(m, packed, kernels | peers, reps, flush))
            times = [f"{k[:-3]} {v * 1e3:.1f} µs" for k, v in rows[-1].items() if k.endswith("_ms")]
            print(f"  K=N={size} M={m}: " + ", ".join(times), flush=True)
        del packed, peers
        torch.cuda.empty_cache()
    kernels = ["triton"] + (["cuda_gemv", "best"] if any("cuda_gemv_ms" in r for r in rows) else [])
    targets = [t for k in kernels for t in evaluate_targets(rows, k, copy_bps)]
    markdown = render(rows, targets, env, copy_bps, notes)
    print("\n" + markdown)
    payload = {"environment": env, "copy_bytes_per_s": copy_bps, "reps": reps, "rows": rows}
    payload |= {"targets": targets, "notes": notes}
    write_outputs(args.out or default_out_dir(), "gpu_kernels", payload, markdown)


if __name__ == "__main__":
    main()
