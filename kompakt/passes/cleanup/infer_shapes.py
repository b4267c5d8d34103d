"""infer-shapes: give every value a dtype and the best shape ONNX shape inference can derive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from kompakt.errors import KompaktError
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class InferShapes(Pass):
    """Run ONNX shape and type inference (with data propagation) over the graph.

    Before: y = MatMul(x: f32[batch,16], W: f32[16,8])          y: unknown
    After:  y = MatMul(x: f32[batch,16], W: f32[16,8])          y: f32[batch,8]
    """

    name: ClassVar[str] = "infer-shapes"
    provides: ClassVar[frozenset[str]] = frozenset({"shapes"})

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        try:
            result = ShapeInferencePass(check_type=True, strict_mode=True, data_prop=True)(model)
        except Exception as err:  # onnx's inference reports inconsistent graphs this way
            raise KompaktError(f"ONNX shape inference failed: {err}") from err
        return PassResult(changed=bool(result.modified))
