"""What every captured or loaded model goes through before passes see it.

- opset raised to kompakt's (21) when lower, so blocked int4 DequantizeLinear can be written;
- every node gets a module path (``kompakt.module``) from what the exporter left behind;
- exporter-internal metadata (stack traces, fx nodes) is dropped: it only bloats exports.
"""

from __future__ import annotations

import ast
import re

import onnx_ir as ir
from onnxscript import version_converter

from kompakt.errors import CaptureError
from kompakt.ir.builder import DEFAULT_OPSET, IR_VERSION
from kompakt.ir.metadata import MODULE_KEY

_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"
_DROP_PREFIXES = ("pkg.torch.onnx.", "namespace")
MAX_OPSET = 22
"""Highest default-domain opset kompakt keeps as is: ORT 1.31 mishandles opset 23's
RotaryEmbedding for batch > 1 (see ENVIRONMENT.md)."""


def normalize(model: ir.Model, source: str, strip_prefix: str = "") -> ir.Model:
    """Upgrades the opset, records module paths, drops exporter metadata (in place)."""
    _upgrade_opset(model, source)
    model.ir_version = IR_VERSION
    for node in model.graph:
        if MODULE_KEY not in node.metadata_props:
            module = _module_from_metadata(node, strip_prefix)
            if module is None:
                module = module_from_node_name(node.name or "")
            node.metadata_props[MODULE_KEY] = module
        for key in [k for k in node.metadata_props if k.startswith(_DROP_PREFIXES)]:
            del node.metadata_props[key]
    return model


def _upgrade_opset(model: ir.Model, source: str) -> None:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise CaptureError(f"{source}: the model imports no standard ONNX opset")
    if opset > MAX_OPSET:
        raise CaptureError(
            f"{source}: opset {opset} is newer than kompakt supports ({DEFAULT_OPSET}-{MAX_OPSET}); "
            f"re-export it with opset {DEFAULT_OPSET} (torch.onnx.export(..., opset_version={DEFAULT_OPSET}))"
        )
    if opset >= DEFAULT_OPSET:
        return
    try:
        version_converter.convert_version(model, target_version=DEFAULT_OPSET)
    except Exception as err:
        raise CaptureError(
            f"{source}: could not upgrade opset {opset} to {DEFAULT_OPSET}: {err}"
        ) from err
    if model.opset_imports.get("", 0) < DEFAULT_OPSET:
        raise CaptureError(f"{source}: opset {opset} could not be upgraded to {DEFAULT_OPSET}")


def _module_from_metadata(node: ir.Node, strip_prefix: str) -> str | None:
    scopes = node.metadata_props.get(_TORCH_SCOPES)
    if scopes is None:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # name_scopes = ['', 'wrapped', 'wrapped.model', ..., '<fx node name>']: the last entry is
    # the op itself, the one before it the innermost module.
    module = names[-2] if len(names) >= 2 else ""
    if strip_prefix:
        if module == strip_prefix:
            return ""
        if module.startswith(strip_prefix + "."):
            return module[len(strip_prefix) + 1 :]
    return module


_LEGACY_NAME = re.compile(r"^/(?P<path>.+)/[^/]+$")


def module_from_node_name(name: str) -> str:
    """``/model/layers.0/mlp/down_proj/MatMul`` (torch's TorchScript exporter) -> module path."""
    match = _LEGACY_NAME.match(name)
    return match["path"].replace("/", ".") if match else ""
