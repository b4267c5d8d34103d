"""Pointwise: one generated Triton kernel per chain of elementwise ops.

A fusion pass groups chains of elementwise ONNX ops (Add, Mul, Gelu, Sigmoid, Where, Cast, ...)
into one node with an onnx_ir body; `chain_from_graph` reads that body into a `Chain`, `render`
writes the Triton source of a kernel computing it, `load_kernel` caches that source on disk by
its sha256 and imports it, and `launch_chain` runs it.

Math: for every element i of the output (shape S, N elements, last dim D), each step computes
``op(args)`` in fp32 over the values at i, where a 'full' input (shape S) contributes ``x[i]``, a
'row' input (shape [D]) ``x[i % D]`` and a 'scalar' input its one element. Inputs are fp32, fp16
or bf16 (one dtype per launch; `Where` conditions may be bool), outputs are stored in the dtype
of the value they name (a `Cast` changes it). Several outputs may come out of one chain.

`launch_chain` lives in kernel.py, the only module that imports triton; it is imported lazily
here so ``import kompakt.codegen.pointwise`` works without triton.
"""

from kompakt.codegen.pointwise.cache import cache_dir, load_kernel, source_hash
from kompakt.codegen.pointwise.chain import POINTWISE_OPS, ROLES, Chain, Operand, Step
from kompakt.codegen.pointwise.from_ir import chain_from_graph
from kompakt.codegen.pointwise.render import KERNEL_NAME, render
from kompakt.codegen.pointwise.spec import Config, aot_variants, choose_config, cost

__all__ = [
    "KERNEL_NAME",
    "POINTWISE_OPS",
    "ROLES",
    "Chain",
    "Config",
    "Operand",
    "Step",
    "aot_variants",
    "cache_dir",
    "chain_from_graph",
    "choose_config",
    "cost",
    "launch_chain",
    "load_kernel",
    "render",
    "source_hash",
]


def __getattr__(name: str):
    if name == "launch_chain":
        from kompakt.codegen.pointwise.kernel import launch_chain

        return launch_chain
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
