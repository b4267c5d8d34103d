"""Which kernel runs a dequant-matmul call: the heuristic, or what the autotune cache measured.

A *choice* is a dict: ``{"family": "triton", <Config fields>}`` for this family's Triton kernel, or
``{"family": "cuda_gemv", <cuda_gemv Config fields>}`` for the CUDA C GEMV (M <= 16, no
activation or residual: its epilogue is a bias only). Without a cache entry the Triton heuristic
(`spec.choose_config`) is used; `tune_shape` fills the cache on a GPU by timing the candidates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from kompakt.codegen.autotune import AutotuneCache, bucket, tune
from kompakt.codegen.dequant_matmul.layout import PackedWeight
from kompakt.codegen.dequant_matmul.spec import Config, choose_config, gemv_tile
from kompakt.errors import CodegenError

KERNEL = "dequant_matmul"


def cache_key(m: int, weight: PackedWeight) -> str:
    """Shape bucket plus the activation dtype: a choice measured in fp16 (the CUDA C GEMV is
    fp16 only) must not be taken for an fp32 or bf16 model of the same shapes."""
    dtype = str(weight.scales.dtype).replace("torch.", "")
    key = bucket(KERNEL, m=m, n=weight.n, k=weight.k, g=weight.group_size, b=weight.bits)
    return f"{key}|{dtype}"


def heuristic(m: int, weight: PackedWeight, arch: str = "sm_90") -> dict:
    config = choose_config(m, weight.n, weight.k, weight.group_size, weight.bits, arch)
    return {"family": "triton", **dataclasses.asdict(config)}


def candidates(
    m: int, weight: PackedWeight, arch: str = "sm_90", cuda: bool = False, epilogue: bool = False
) -> list[dict]:
    """The heuristic's choice and its neighbours (tile widths, split-K), its split-K sum in a
    second kernel, the other GEMV tile (registers or tensor cores), plus CUDA C for GEMV."""
    base = choose_config(m, weight.n, weight.k, weight.group_size, weight.bits, arch)
    seen, out = set(), []
    for block_n in (base.block_n // 2, base.block_n, base.block_n * 2):
        for split in (max(1, base.split_k // 2), base.split_k, base.split_k * 2):
            config = dataclasses.replace(base, block_n=max(16, block_n), split_k=split)
            key = dataclasses.astuple(config)
            if key not in seen:
                seen.add(key)
                out.append({"family": "triton", **dataclasses.asdict(config)})
    if base.split_k > 1:  # the split-K sum in a second kernel rather than by the last split
        other = dataclasses.replace(base, serial_reduce=False)
        out.append({"family": "triton", **dataclasses.asdict(other)})
    if base.regime == "gemv" and m <= 8:  # the other GEMV tile: registers vs tensor cores
        rows, block_n, block_k = gemv_tile(m, weight.k, weight.group_size, not base.use_dot)
        other = dataclasses.replace(base, block_m=rows, block_n=block_n, block_k=block_k)
        out.append({"family": "triton", **dataclasses.asdict(other)})
    if cuda and m <= 16 and weight.bits == 4 and not epilogue:
        from kompakt.codegen.cuda_gemv.spec import choose_config as cuda_choose

        gemv = cuda_choose(m, weight.n, weight.k, arch, weight.group_size)
        out.append({"family": "cuda_gemv", **dataclasses.asdict(gemv)})
    return out


def launch_choice(
    choice: dict,
    x: torch.Tensor,
    weight: PackedWeight,
    bias: torch.Tensor | None = None,
    act: str = "none",
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Runs the call with the kernel ``choice`` names."""
    params = {k: v for k, v in choice.items() if k != "family"}
    family = choice.get("family", "triton")
    if family == "triton":
        from kompakt.codegen.dequant_matmul.kernel import launch_dequant_matmul

        return launch_dequant_matmul(x, weight, bias, act, residual, Config(**params))
    if family == "cuda_gemv":
        if act != "none" or residual is not None:
            raise CodegenError("the CUDA C GEMV has no activation or residual epilogue")
        from kompakt.codegen.cuda_gemv import Config as GemvConfig
        from kompakt.codegen.cuda_gemv import launch_cuda_gemv

        return launch_cuda_gemv(x, weight, bias, GemvConfig(**params))
    raise CodegenError(f"unknown kernel family '{family}' in an autotune entry")


def tune_shape(
    cache: AutotuneCache,
    m: int,
    weight: PackedWeight,
    timer: Callable[[Callable[[], None]], float],
    arch: str = "sm_90",
    choices: list[dict] | None = None,
) -> dict:
    """Times every candidate at ``m`` rows on the weight's device; stores the fastest."""
    x = torch.randn(m, weight.k, device=weight.qweight.device).to(weight.scales.dtype)
    cuda = weight.qweight.is_cuda and weight.scales.dtype == torch.float16
    options = choices or candidates(m, weight, arch, cuda=cuda)
    return tune(cache, cache_key(m, weight), options, lambda c: launch_choice(c, x, weight), timer)
