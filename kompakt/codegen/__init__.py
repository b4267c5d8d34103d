"""Kernel generation (Triton and CUDA C), one kernel family per folder.

Empty in this release: fused kernels and the GPU runtime are the next milestone (see
docs/architecture.md, "Codegen and runtime"). Compiled models run on the reference and
ONNX Runtime backends meanwhile.
"""
