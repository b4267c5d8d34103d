"""Dequant-matmul: ``epilogue(x @ W)`` with W stored as 4- or 8-bit integers and group scales.

W4A16/W8A16 weight-only quantization's kernel family. ``layout.py`` packs the IR's blocked
``DequantizeLinear`` weights into the layout the kernels read, ``reference.py`` is the semantics,
``kernel.py`` the Triton kernels (imports triton), ``spec.py`` the launch heuristic by regime
(GEMV / split-K / GEMM) and the cost. See README.md for the layout.
"""

from kompakt.codegen.dequant_matmul.layout import PackedWeight, pack, unpack
from kompakt.codegen.dequant_matmul.reference import (
    ACTIVATIONS,
    GLU_ACTIVATIONS,
    dequant_matmul_reference,
    interleave_halves,
)
from kompakt.codegen.dequant_matmul.spec import Config, choose_config, cost

__all__ = [
    "ACTIVATIONS",
    "GLU_ACTIVATIONS",
    "Config",
    "PackedWeight",
    "choose_config",
    "cost",
    "dequant_matmul_reference",
    "interleave_halves",
    "pack",
    "unpack",
]
