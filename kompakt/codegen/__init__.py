"""Kernel generation: one kernel family per folder, each with a spec, kernels, a torch reference.

Families: ``dequant_matmul`` (W4A16/W8A16, GEMV/split-K/GEMM), ``int8_matmul`` (W8A8) and
``fp8_matmul`` (sm_89+), which share ``scaled_matmul``'s kernel and tiling, ``norm`` (RMSNorm/LayerNorm + residual), ``rotary``, ``glu``
(SwiGLU/GeGLU), ``pointwise`` (generated kernels for elementwise chains), ``attention``
(flash prefill and decode), ``cuda_gemv`` (W4A16 GEMV as CUDA C). ``registry`` maps fused-node
patterns to the family that runs them (``binding`` reads a node's input roles); ``autotune`` keeps
measured launch choices per device; ``aot`` compiles kernels for sm_80/sm_90 without a GPU.
Importing this package does not import Triton; only a family's ``kernel.py`` does.
"""
