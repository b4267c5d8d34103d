"""Thin helpers over onnx_ir: tensors <-> torch, a stable printer, a verifier, metadata keys."""

from kompakt.ir.builder import DEFAULT_OPSET, IR_VERSION, constant, make_model, unique_name
from kompakt.ir.metadata import MODULE_KEY, module_of, set_module
from kompakt.ir.printer import format_graph, format_node
from kompakt.ir.tensors import from_torch, onnx_dtype, to_torch, torch_dtype
from kompakt.ir.verify import VerificationError, verify

__all__ = [
    "DEFAULT_OPSET",
    "IR_VERSION",
    "MODULE_KEY",
    "VerificationError",
    "constant",
    "format_graph",
    "format_node",
    "from_torch",
    "make_model",
    "module_of",
    "onnx_dtype",
    "set_module",
    "to_torch",
    "torch_dtype",
    "unique_name",
    "verify",
]
