"""canonicalize: the standard clean-up every pipeline starts with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.cleanup.eliminate_common_subexpressions import EliminateCommonSubexpressions
from kompakt.passes.cleanup.fold_constants import FoldConstants
from kompakt.passes.cleanup.gemm_to_matmul import GemmToMatMul
from kompakt.passes.cleanup.remove_dead_code import RemoveDeadCode
from kompakt.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Gemm to MatMul, constant folding, CSE, dead-code removal, topological order.

    After it, linear layers are MatMuls with [K, N] constant weights, shape arithmetic on
    constants is folded, and nodes are in dependency order: what compression passes expect.

    Before: y = Gemm(Reshape(x, Concat(Shape(W), [-1])), W, b, transB=1)
    After:  y = Add(MatMul(Reshape(x, [16, -1]), Wᵀ), b)
    """

    name: ClassVar[str] = "canonicalize"
    provides: ClassVar[frozenset[str]] = frozenset({"canonical"})

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        total = PassResult()
        for step in (
            GemmToMatMul(),
            FoldConstants(),
            EliminateCommonSubexpressions(),
            RemoveDeadCode(),
        ):
            result = step.run(model, ctx)
            total.changed |= result.changed
            for key, value in result.stats.items():
                total.stats[f"{step.name}.{key}"] = value
            total.notes += result.notes
        TopologicalSortPass()(model)
        total.stats["contiguous_weights"] = _make_weights_contiguous(model.graph)
        return total


def _make_weights_contiguous(graph: ir.Graph) -> int:
    """Stores transposed-view initializers (a folded Transpose of a Linear weight is a strided
    numpy view) as contiguous arrays, once. Otherwise every read as a torch tensor copies the
    whole weight again: a layer's worth of memory at each calibration stage and in each pass."""
    changed = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if isinstance(raw, np.ndarray) and not raw.flags["C_CONTIGUOUS"]:
            value.const_value = ir.Tensor(np.ascontiguousarray(raw), name=tensor.name)
            changed += 1
    return changed
