"""Keys kompakt stores in IR metadata, and helpers to read them.

Every node records the module path it came from (``model.layers.3.mlp.down_proj``) so users can
select layers by name; quantized weights record how they were produced.
"""

from __future__ import annotations

import onnx_ir as ir

MODULE_KEY = "kompakt.module"
"""Node metadata: the dotted path of the nn.Module the node was traced from ('' for the root)."""

PIPELINE_KEY = "kompakt.pipeline"
"""Model metadata: the pipeline string the model was compiled with."""

TARGET_KEY = "kompakt.target"
"""Model metadata: the target string the model was compiled for."""


def module_of(node: ir.Node) -> str:
    """The module path recorded on a node, or '' when unknown."""
    return node.metadata_props.get(MODULE_KEY, "")


def set_module(node: ir.Node, module: str) -> None:
    node.metadata_props[MODULE_KEY] = module


def copy_module(source: ir.Node, *targets: ir.Node) -> None:
    """Gives new nodes the module path of the node they replace."""
    module = module_of(source)
    if module:
        for target in targets:
            set_module(target, module)
