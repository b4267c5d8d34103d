"""Export the IR as a standard ONNX file that onnx.checker accepts and ONNX Runtime runs."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.builder import IR_VERSION
from kompakt.ir.fused import inline_fused
from kompakt.ir.verify import verify

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Above 1 GiB of weights, tensors go to a side file (protobuf cannot hold more than 2 GiB)."""


def check_writable(path: str | os.PathLike) -> Path:
    """Fails early, naming the path, when ``path`` cannot be written as a file."""
    path = Path(path)
    if path.is_dir():
        raise KompaktError(f"cannot write '{path}': it is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KompaktError(f"cannot write '{path}': folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise KompaktError(f"cannot write '{path}': permission denied")
    return path


def export_onnx(
    model: ir.Model,
    path: str | os.PathLike,
    external_data: bool | None = None,
    matmulnbits: bool = False,
) -> Path:
    """Writes ``model`` to ``path`` and checks it with onnx.checker.

    Args:
        model: The IR; not modified.
        path: Output file. External data, when used, goes next to it as ``<name>.data``.
        external_data: Force (True) or forbid (False) a side file for weights; by default used
            above `EXTERNAL_DATA_THRESHOLD`.
        matmulnbits: Write quantized MatMuls as ONNX Runtime's ``com.microsoft::MatMulNBits``
            (what kompakt's onnxruntime backend runs) instead of standard DequantizeLinear ->
            MatMul, which other runtimes read too.
    """
    path = check_writable(path)
    model = inline_fused(model)  # fused groups go back to the standard ops they stand for
    if matmulnbits:
        from kompakt.runtime.backends import lower_for_onnxruntime

        model = lower_for_onnxruntime(model)
    leftover = sorted({n.op_type for n in model.graph if n.domain == "kompakt"})
    if leftover:
        raise KompaktError(f"cannot export: kompakt ops {leftover} have no standard ONNX form yet")
    verify(model)
    if external_data is None:
        external_data = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    saved_version = model.ir_version
    model.ir_version = IR_VERSION
    try:
        if external_data:
            ir.save(model, path, external_data=path.name + ".data")
        else:
            ir.save(model, path)
    except OSError as err:
        raise KompaktError(f"cannot write '{path}': {err}") from err
    finally:
        model.ir_version = saved_version
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise KompaktError(f"exported '{path}' fails onnx.checker: {err}") from err
    return path


def _weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )
