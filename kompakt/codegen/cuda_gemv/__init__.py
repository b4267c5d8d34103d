"""CUDA C W4A16 GEMV: ``y[M, N] = x[M, K] @ W (+ bias[N])`` for small M (1..16), built at run time.

W is a 4-bit `PackedWeight` (kompakt.codegen.dequant_matmul.layout): qweight int32
[ceil(K/8), N] with 8 nibbles along K, fp16 scales and zeros [ceil(K/group_size), N], and
``W = (q - zeros) * scales``. x, bias and y are fp16; sums are fp32; the semantics are
`kompakt.codegen.dequant_matmul.dequant_matmul_reference` (no activation, no residual).

- ``spec.py``: `Config` (threads, columns per thread, split-K, M tile, K tile, unroll, group
  size), `choose_config(m, n, k, arch, group_size)`, `cost(m, n, k, group_size)`.
- ``render.py``: `render(config)` -> the CUDA source (kernels + torch launcher).
- ``build.py``: `load(config)` (load_inline, cached by sha256), `launch_cuda_gemv(x, packed,
  bias, config)`, `compile_ptx(config, arch)` (nvcc without a GPU), `parse_resource_usage`.
- ``emulate.py``: the kernel's indexing and reduction order replayed in torch.
- ``hostrun.py``: `host_run(x, packed, bias, config)` runs the rendered kernel source itself on
  the CPU (g++ with a shim header: a std::thread per CUDA thread), for tests without a GPU.

No triton anywhere in this family; torch's cpp_extension is imported only when a kernel is built.
See README.md for how threads map onto the layout.
"""

from kompakt.codegen.cuda_gemv.build import (
    ResourceUsage,
    compile_ptx,
    launch_cuda_gemv,
    load,
    parse_resource_usage,
)
from kompakt.codegen.cuda_gemv.emulate import emulate
from kompakt.codegen.cuda_gemv.hostrun import build_host, host_run
from kompakt.codegen.cuda_gemv.render import kernel_name, reduce_name, render, render_kernel
from kompakt.codegen.cuda_gemv.spec import Config, choose_config, cost

__all__ = [
    "Config",
    "ResourceUsage",
    "build_host",
    "choose_config",
    "compile_ptx",
    "cost",
    "emulate",
    "host_run",
    "kernel_name",
    "launch_cuda_gemv",
    "load",
    "parse_resource_usage",
    "reduce_name",
    "render",
    "render_kernel",
]
