"""Load an ONNX model (file path or ModelProto) into the IR, with clear errors for bad files."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import onnx_ir as ir

from kompakt.errors import CaptureError
from kompakt.ir.verify import VerificationError, verify
from kompakt.lowering.normalize import normalize, serde_upgrade


def load_onnx(source: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """Loads ``source`` into an `ir.Model` at kompakt's opset, external data included.

    Raises:
        CaptureError: the file is missing, truncated or corrupt, its external data is missing,
            or its opset cannot be brought to kompakt's.
    """
    if isinstance(source, onnx.ModelProto):
        label = f"ModelProto '{source.graph.name or '?'}'"
        try:
            model = ir.serde.deserialize_model(serde_upgrade(source, label))
        except CaptureError:
            raise
        except Exception as err:
            raise CaptureError(f"{label} could not be read: {err}") from err
    else:
        path = Path(source)
        label = f"'{path}'"
        if not path.exists():
            raise CaptureError(f"ONNX file {label} does not exist")
        if not path.is_file():
            raise CaptureError(f"{label} is not a file")
        try:
            # Weights stay on disk (onnx_ir maps them lazily); only the graph is parsed here.
            proto = onnx.load(path, load_external_data=False)
        except Exception as err:
            raise CaptureError(
                f"{label} is not a readable ONNX model (truncated or corrupt?): {type(err).__name__}: {err}"
            ) from err
        model = ir.serde.deserialize_model(serde_upgrade(proto, label))
        ir.external_data.set_base_dir(model.graph, path.parent)
        _check_external_data(model, path)
    try:
        verify(model)
    except VerificationError as err:
        raise CaptureError(f"{label} is malformed (truncated or corrupt?): {err}") from err
    return normalize(model, source=label)


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fails now, naming the file, rather than at the first use of a missing tensor."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.base_dir or path.parent) / tensor.location
        if not location.is_file():
            raise CaptureError(
                f"'{path}': initializer '{name}' stores its data in '{location}', which does not exist"
            )
        end = (tensor.offset or 0) + (tensor.length or 0)
        if end > location.stat().st_size:
            raise CaptureError(
                f"'{path}': initializer '{name}' needs bytes up to {end} of '{location}', "
                f"which has only {location.stat().st_size} (truncated?)"
            )
