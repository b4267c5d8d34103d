"""Front ends (torch module, ONNX file) into the IR, and the IR back out as an ONNX file."""

from kompakt.lowering.from_onnx import load_onnx
from kompakt.lowering.from_torch import capture_module
from kompakt.lowering.to_onnx import export_onnx

__all__ = ["capture_module", "export_onnx", "load_onnx"]
