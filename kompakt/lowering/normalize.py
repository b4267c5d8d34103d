"""What every captured or loaded model goes through before passes see it.

- opset raised to kompakt's (21) when lower, so blocked int4 DequantizeLinear can be written;
- every node gets a module path (``kompakt.module``) from what the exporter left behind;
- exporter-internal metadata (stack traces, fx nodes) is dropped: it only bloats exports.
"""

from __future__ import annotations

import ast
import re

import onnx
import onnx.version_converter
import onnx_ir as ir
from onnxscript import version_converter

from kompakt.errors import CaptureError
from kompakt.ir.builder import DEFAULT_OPSET, IR_VERSION
from kompakt.ir.metadata import MODULE_KEY

_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"
_DROP_PREFIXES = ("pkg.torch.", "namespace")
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
        _drop_exporter_metadata(node)
        for value in node.outputs:
            _drop_exporter_metadata(value)
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        _drop_exporter_metadata(value)
    return model


def _drop_exporter_metadata(item: ir.Node | ir.Value) -> None:
    for key in [k for k in item.metadata_props if k.startswith(_DROP_PREFIXES)]:
        del item.metadata_props[key]


def _upgrade_opset(model: ir.Model, source: str) -> None:
    opset = _default_opset(model, source)
    if opset >= DEFAULT_OPSET:
        return
    if opset < 20:
        # Between old opsets ops changed form (Squeeze's axes became an input, ...); only ONNX's
        # own converter has an adapter per op. Round-trip through a proto for it.
        upgraded = serde_upgrade(ir.to_proto(model), source)
        converted = ir.serde.deserialize_model(upgraded)
        model.graph = converted.graph  # opset imports belong to the graph and come with it
        return
    # 20 -> 21 only widens types (int4 in Cast, QuantizeLinear, ...); no op changes form.
    try:
        version_converter.convert_version(model, target_version=DEFAULT_OPSET)
    except Exception as err:
        raise CaptureError(
            f"{source}: could not upgrade opset {opset} to {DEFAULT_OPSET}: {err}"
        ) from err


def _default_opset(model: ir.Model, source: str) -> int:
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise CaptureError(f"{source}: the model imports no standard ONNX opset")
    if opset > MAX_OPSET:
        raise CaptureError(
            f"{source}: opset {opset} is newer than kompakt supports ({DEFAULT_OPSET}-{MAX_OPSET}); "
            f"re-export it with opset {DEFAULT_OPSET} (torch.onnx.export(..., opset_version={DEFAULT_OPSET}))"
        )
    return opset


def serde_upgrade(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """Converts a proto below opset 21 with ONNX's version converter (one adapter per op)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= DEFAULT_OPSET:
        return proto
    try:
        return onnx.version_converter.convert_version(proto, DEFAULT_OPSET)
    except Exception as err:
        raise CaptureError(
            f"{source}: could not upgrade opset {opset} to {DEFAULT_OPSET} with ONNX's converter: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err


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
