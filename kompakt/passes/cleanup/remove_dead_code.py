"""remove-dead-code: drop nodes and initializers no output depends on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class RemoveDeadCode(Pass):
    """Remove nodes and initializers that no graph output depends on (onnx_ir's pass).

    Before: a = Relu(x); b = Sigmoid(x); return a
    After:  a = Relu(x); return a
    """

    name: ClassVar[str] = "remove-dead-code"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        nodes, inits = model.graph.num_nodes(), len(model.graph.initializers)
        RemoveUnusedNodesPass()(model)
        removed_nodes = nodes - model.graph.num_nodes()
        removed_inits = inits - len(model.graph.initializers)
        return PassResult(
            changed=bool(removed_nodes or removed_inits),
            stats={"nodes_removed": removed_nodes, "initializers_removed": removed_inits},
        )
