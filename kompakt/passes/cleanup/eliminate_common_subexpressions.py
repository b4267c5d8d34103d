"""eliminate-common-subexpressions: compute each distinct expression once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class EliminateCommonSubexpressions(Pass):
    """Merge nodes that compute the same op on the same inputs (onnx_ir's CSE pass).

    Before: a = Shape(x); b = Shape(x); y = Concat(a, b)
    After:  a = Shape(x); y = Concat(a, a)
    """

    name: ClassVar[str] = "eliminate-common-subexpressions"

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        before = model.graph.num_nodes()
        CommonSubexpressionEliminationPass()(model)
        merged = before - model.graph.num_nodes()
        return PassResult(changed=merged > 0, stats={"merged": merged})
