"""Fill the dequant-matmul autotune cache on a GPU for the shapes of a model family.

    python -m benchmarks.gpu_autotune [--quick] [--shapes llama2-7b] [--out DIR]

For each weight shape (K, N) and each M in the sweep it times every candidate kernel choice
(`kompakt.codegen.dequant_matmul.tuning.candidates`: the heuristic's tiles and neighbours, plus
the CUDA C GEMV for M <= 16) with CUDA events and stores the fastest in the device's cache file
(`kompakt.codegen.autotune`), which the triton backend then follows offline. Prints, per shape,
how much the measured choice gains over the heuristic, and copies the cache file to --out.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from benchmarks.gpu_kernels import default_out_dir, environment, random_packed, require_cuda

# (K, N) of each GEMM in one decoder layer as kompakt's GPU targets run it (merge-projections:
# q/k/v as one, gate/up as one), Llama-2-7B: q/k/v, o, gate/up, down
SHAPES = {"llama2-7b": [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]}
MS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_MS = (1, 16)


def gain(heuristic_s: float, best_s: float) -> float:
    """How many times faster the measured choice is than the heuristic's."""
    return heuristic_s / best_s if best_s > 0 else float("nan")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="M in {1, 16}, fewer repeats")
    parser.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--out", default=None, help="where to copy the cache file ($OUT)")
    parser.add_argument(
        "--no-cuda-gemv",
        action="store_true",
        help="leave the CUDA C GEMV out of the candidates (each config is a ~1 min nvcc build)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    require_cuda("gpu_autotune")
    from kompakt.codegen.autotune import AutotuneCache, cuda_timer
    from kompakt.codegen.dequant_matmul.tuning import (
        cache_key,
        candidates,
        heuristic,
        launch_choice,
        tune_shape,
    )
    from kompakt.codegen.devices import autotune_device, tuning_arch

    env = environment()
    arch = tuning_arch(torch.device("cuda"))
    cache = AutotuneCache.for_device(autotune_device(torch.device("cuda")))  # as the binder
    timer = cuda_timer(repeats=10 if args.quick else 30)
    print(f"gpu_autotune on {env['device']} ({arch}), {env['date']}", flush=True)
    for k, n in SHAPES[args.shapes]:
        packed = random_packed(k, n, "cuda")
        for m in QUICK_MS if args.quick else MS:
            choices = candidates(m, packed, arch, cuda=not args.no_cuda_gemv)
            best = tune_shape(cache, m, packed, timer, arch, choices)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            base = timer(lambda x=x, p=packed, m=m: launch_choice(heuristic(m, p, arch), x, p))
            best_s = cache.entries[cache_key(m, packed)]["seconds"]
            print(
                f"  K={k} N={n} M={m}: {best['family']} {best.get('block_n', '')} "
                f"split {best.get('split_k', '')}: {best_s * 1e6:.1f} µs, "
                f"{gain(base, best_s):.2f}x the heuristic",
                flush=True,
            )
        del packed
        torch.cuda.empty_cache()
    path = cache.save()
    out = Path(args.out) if args.out else default_out_dir()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, out / path.name)
    print(f"\nwrote {path} (and a copy in {out})")


if __name__ == "__main__":
    main()
