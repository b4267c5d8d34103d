"""Runs the rendered device code itself on the CPU: the kernel text, compiled by g++ via a shim.

`emulate` re-implements the kernel in torch; this compiles the very source `render_kernel` emits
with a small header standing in for ``cuda_fp16.h``: ``__half`` is ``_Float16``, ``__shared__``
is function-``static`` (blocks run one at a time), every CUDA thread of a block is a
``std::thread`` with its own ``threadIdx``/``blockIdx``, and ``__syncthreads`` is a
``std::barrier`` across them. ``fmaf`` is fused on the host too, so the result should match the
GPU's bit for bit. Slow (a thread per CUDA thread): for small shapes in tests only.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kompakt.codegen.cuda_gemv.render import kernel_name, reduce_name, render_kernel
from kompakt.codegen.cuda_gemv.spec import Config
from kompakt.codegen.dequant_matmul.layout import PackedWeight
from kompakt.errors import CodegenError

_SHIM = r"""// Host stand-in for cuda_fp16.h and the CUDA built-ins the kernels use (kompakt hostrun).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <thread>
#include <vector>
struct KgDim3 { unsigned x, y, z; };
static thread_local KgDim3 threadIdx, blockIdx;
static std::barrier<>* kg_barrier;
#define __global__
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() kg_barrier->arrive_and_wait()
typedef _Float16 __half;
struct float4 { float x, y, z, w; };
static inline float __half2float(__half h) { return (float)h; }
static inline __half __float2half_rn(float f) { return (__half)f; }  // round to nearest even
static inline int __ldg(const int* p) { return *p; }
static inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
using std::min;
"""

_DRIVER = r"""
// Launches the grid the way the torch launcher does, one block at a time.
extern "C" void kg_run_$name(const __half* x, const int* qweight, const __half* scales,
                       const __half* zeros, const __half* bias, float* partial, __half* y,
                       int M, int N, int K) {
  const unsigned gx = (N + KG_THREADS * KG_COLS - 1) / (KG_THREADS * KG_COLS);
  const unsigned gz = (M + KG_M_TILE - 1) / KG_M_TILE;
  std::barrier<> bar(KG_THREADS);
  kg_barrier = &bar;
  for (unsigned bz = 0; bz < gz; ++bz)
    for (unsigned by = 0; by < KG_SPLIT_K; ++by)
      for (unsigned bx = 0; bx < gx; ++bx) {
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < KG_THREADS; ++t)
          threads.emplace_back([=] {
            threadIdx = {t, 0, 0};
            blockIdx = {bx, by, bz};
            $kernel(x, qweight, scales, zeros, bias, partial, y, M, N, K);
          });
        for (auto& th : threads) th.join();
      }
  if (KG_SPLIT_K > 1) {  // no barriers in the reduction: run its threads in order
    const unsigned blocks = (M * N + KG_REDUCE_THREADS - 1) / KG_REDUCE_THREADS;
    for (unsigned b = 0; b < blocks; ++b)
      for (unsigned t = 0; t < KG_REDUCE_THREADS; ++t) {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        $reduce(partial, bias, y, M, N);
      }
  }
}
"""

_LIBS: dict[str, ctypes.CDLL] = {}  # config name -> the library holding its kg_run_<name>
_DIR = tempfile.TemporaryDirectory(prefix="kompakt_hostrun_")  # lives as long as the process


def build_host(configs: list[Config]) -> None:
    """Compiles the rendered kernels of ``configs`` for the host, all in one g++ run (most of
    its time is the C++ headers); each config's code sits in its own namespace."""
    todo = list({c.name: c for c in configs if c.name not in _LIBS}.values())
    if not todo:
        return
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise CodegenError("cuda_gemv hostrun: no C++ compiler (g++ or clang++) on PATH")
    parts = ["#include <cuda_fp16.h>  // the shim, first: later includes are no-ops\n"]
    for c in todo:
        driver = _DRIVER.replace("$kernel", kernel_name(c)).replace("$reduce", reduce_name(c))
        body = render_kernel(c) + driver.replace("$name", c.name)
        parts.append(f"namespace kg_{c.name} {{\n{body}}}  // namespace kg_{c.name}\n")
    source = "".join(parts)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    root = Path(_DIR.name)
    (root / "cuda_fp16.h").write_text(_SHIM)
    src, lib = root / f"gemv_{digest}.cpp", root / f"gemv_{digest}.so"
    src.write_text(source)
    # -fno-strict-aliasing: the kernel reads shared fp32 as float4 through a cast
    command = [cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC", "-pthread"]
    result = subprocess.run(
        [*command, f"-I{root}", str(src), "-o", str(lib)], capture_output=True, text=True
    )
    if result.returncode != 0:
        names = ", ".join(c.name for c in todo)
        raise CodegenError(f"cuda_gemv hostrun: {cxx} failed for {names}:\n{result.stderr}")
    library = ctypes.CDLL(str(lib))
    for c in todo:
        _LIBS[c.name] = library


def host_run(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """What the CUDA kernel computes, by running its source on the CPU; y is [..., N] fp16."""
    from kompakt.codegen.cuda_gemv.build import check_inputs

    x2, config = check_inputs(x, packed, bias, config, "sm_90")
    m, k = x2.shape
    n = packed.n
    tensors = [
        x2.contiguous().cpu(),
        packed.qweight.contiguous().cpu(),
        packed.scales.contiguous().cpu(),
        packed.zeros.contiguous().cpu(),
    ]
    b = None if bias is None else bias.contiguous().cpu()
    partial = torch.zeros(config.split_k, m, n)
    y = torch.zeros(m, n, dtype=torch.float16)
    pointer = ctypes.c_void_p
    build_host([config])
    getattr(_LIBS[config.name], f"kg_run_{config.name}")(
        *[pointer(t.data_ptr()) for t in tensors],
        pointer(b.data_ptr()) if b is not None else pointer(None),
        pointer(partial.data_ptr()),
        pointer(y.data_ptr()),
        ctypes.c_int(m),
        ctypes.c_int(n),
        ctypes.c_int(k),
    )
    return y.reshape(*x.shape[:-1], n)
