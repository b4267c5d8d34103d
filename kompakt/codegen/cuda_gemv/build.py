"""Builds and launches the CUDA C GEMV: load_inline at run time, nvcc ahead of time without a GPU.

`load` compiles `render(config)` with ``torch.utils.cpp_extension.load_inline`` into
``$KOMPAKT_CACHE_DIR`` (default ``~/.cache/kompakt/kernels``), one folder per sha256 of the
source, so a config is compiled once per machine and re-imported afterwards. `compile_ptx` runs
nvcc on the device code alone (no torch headers) for sm_80 / sm_90 and returns the PTX and
ptxas's ``--resource-usage`` report: what the CPU tests check.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.codegen.cuda_gemv.render import FUNCTION, declaration, render, render_kernel
from kompakt.codegen.cuda_gemv.spec import ARCHS, Config, choose_config
from kompakt.codegen.dequant_matmul.layout import PackedWeight
from kompakt.codegen.devices import tuning_arch
from kompakt.errors import CodegenError

_LOADED: dict[str, object] = {}  # source sha256 -> the imported extension module


def cache_dir() -> Path:
    root = os.environ.get("KOMPAKT_CACHE_DIR") or Path.home() / ".cache" / "kompakt"
    return Path(root) / "kernels"


def check_inputs(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    config: Config | None,
    arch: str,
) -> tuple[torch.Tensor, Config]:
    """Validates a launch; returns x as [M, K] and the config (chosen when None)."""
    if packed.bits != 4:
        raise CodegenError(f"cuda_gemv: packed weight has {packed.bits}-bit values; needs 4-bit")
    k, n = packed.k, packed.n
    if x.dtype != torch.float16:
        raise CodegenError(f"cuda_gemv: x must be float16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != k or x.numel() == 0:
        raise CodegenError(
            f"cuda_gemv: x shape {list(x.shape)} must be [..., {k}] (K) and non-empty"
        )
    rows, groups = -(-k // 8), -(-k // packed.group_size)
    q = packed.qweight
    if q.dtype != torch.int32 or q.dim() != 2 or q.shape[0] < rows or q.shape[1] != n:
        raise CodegenError(
            f"cuda_gemv: qweight {q.dtype} {list(q.shape)} must be int32 [>= {rows}, {n}]"
        )
    for name, t in (("scales", packed.scales), ("zeros", packed.zeros)):
        if t.dtype != torch.float16 or t.dim() != 2 or t.shape[0] < groups or t.shape[1] != n:
            raise CodegenError(
                f"cuda_gemv: {name} {t.dtype} {list(t.shape)} must be float16 [>= {groups}, {n}]"
            )
    if bias is not None and (bias.dtype != torch.float16 or tuple(bias.shape) != (n,)):
        raise CodegenError(
            f"cuda_gemv: bias {bias.dtype} {list(bias.shape)} must be float16 [{n}] (N)"
        )
    tensors = [x, q, packed.scales, packed.zeros] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise CodegenError("cuda_gemv: x, the packed weight and bias are on different devices")
    x2 = x.reshape(-1, k)
    if config is None:
        config = choose_config(x2.shape[0], n, k, arch, packed.group_size)
    if config.group_size != packed.group_size:
        raise CodegenError(
            f"cuda_gemv: config group_size {config.group_size} != the weight's {packed.group_size}"
        )
    return x2, config


def load(config: Config):
    """The compiled extension for ``config`` (built on first use, then cached on disk)."""
    if not torch.cuda.is_available():
        raise CodegenError(
            "cuda_gemv: building the CUDA kernel needs a CUDA GPU; none is available"
        )
    source = render(config)
    digest = hashlib.sha256(source.encode()).hexdigest()
    if digest in _LOADED:
        return _LOADED[digest]
    from torch.utils.cpp_extension import load_inline  # slow import; only on a GPU machine

    name = f"kompakt_cuda_gemv_{digest[:16]}"
    directory = cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    try:
        module = load_inline(
            name=name,
            cpp_sources=declaration(),
            cuda_sources=source,
            functions=[FUNCTION],
            extra_cuda_cflags=["-O3"],
            build_directory=str(directory),
        )
    except Exception as e:  # load_inline raises RuntimeError carrying the compiler's output
        raise CodegenError(f"cuda_gemv: building {name} ({config.name}) failed: {e}") from e
    _LOADED[digest] = module
    return module


def launch_cuda_gemv(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """``y = x @ W (+ bias)`` in fp16 for x [..., K] and a 4-bit `PackedWeight`; y is [..., N]."""
    arch = tuning_arch(x.device)
    x2, config = check_inputs(x, packed, bias, config, arch)
    if not x.is_cuda:
        raise CodegenError(f"cuda_gemv: x is on {x.device}; the kernel needs CUDA tensors")
    module = load(config)
    y = getattr(module, FUNCTION)(
        x2.contiguous(),
        packed.qweight.contiguous(),
        packed.scales.contiguous(),
        packed.zeros.contiguous(),
        None if bias is None else bias.contiguous(),
    )
    return y.reshape(*x.shape[:-1], packed.n)


@dataclass(frozen=True)
class ResourceUsage:
    """What ptxas reports for one kernel."""

    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def compile_ptx(config: Config, arch: str) -> tuple[str, str]:
    """``(ptx, resource_usage_text)`` of the device code for ``arch`` ("sm_80" or "sm_90")."""
    if arch not in ARCHS:
        raise CodegenError(f"cuda_gemv: arch '{arch}' is not one of {', '.join(ARCHS)}")
    nvcc = shutil.which("nvcc") or _cuda_home_nvcc()
    if nvcc is None:
        raise CodegenError("cuda_gemv: nvcc not found on PATH or in $CUDA_HOME/bin")
    with tempfile.TemporaryDirectory(prefix="kompakt_cuda_gemv_") as tmp:
        src = Path(tmp) / "gemv.cu"
        src.write_text(render_kernel(config))
        common = [nvcc, f"-arch={arch}", "-O3", "-std=c++17"]
        _nvcc(common + ["-ptx", "-o", str(Path(tmp) / "gemv.ptx"), str(src)], config)
        usage = _nvcc(
            common + ["-cubin", "--resource-usage", "-o", str(Path(tmp) / "gemv.cubin"), str(src)],
            config,
        )
        return (Path(tmp) / "gemv.ptx").read_text(), usage


def parse_resource_usage(text: str) -> dict[str, ResourceUsage]:
    """Kernel name -> registers, spills and shared memory, from ``--resource-usage`` output."""
    usage: dict[str, ResourceUsage] = {}
    for block in re.split(r"Compiling entry function ", text)[1:]:
        name = re.match(r"'(\w+)'", block)
        regs = re.search(r"Used (\d+) registers", block)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
        smem = re.search(r"(\d+) bytes smem", block)
        if not (name and regs and spills):
            raise CodegenError(f"cuda_gemv: cannot parse ptxas resource usage:\n{block}")
        usage[name.group(1)] = ResourceUsage(
            int(regs.group(1)),
            int(spills.group(1)),
            int(spills.group(2)),
            int(smem.group(1)) if smem else 0,
        )
    return usage


def _nvcc(command: list[str], config: Config) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CodegenError(
            f"cuda_gemv: nvcc failed for {config.name}:\n{result.stderr}{result.stdout}"
        )
    return result.stdout + result.stderr


def _cuda_home_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    return str(candidate) if candidate is not None and candidate.exists() else None
