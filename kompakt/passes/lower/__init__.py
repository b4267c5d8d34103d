"""Lowerings to a specific runtime's ops (ONNX Runtime contrib ops), applied at the edge."""
