"""fold-constants: compute at compile time whatever does not depend on the graph inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
from onnxscript.optimizer import fold_constants

from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.registry import register_pass

# Ops whose constant inputs are the compressed form of a weight: folding them would write the
# decompressed float weight back into the model and undo the compression.
KEEP_UNFOLDED = frozenset({"DequantizeLinear", "QuantizeLinear", "MatMulNBits"})
# Metadata key marking any other node that decompresses a weight (a codebook lookup and the Casts
# around it): the same reason, for ops that are not quantization ops by type.
KEEP_UNFOLDED_KEY = "kompakt.keep_unfolded"


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Fold nodes whose inputs are all constants into constants (onnxscript's folder).

    Dequantization of compressed weights is never folded (see KEEP_UNFOLDED, KEEP_UNFOLDED_KEY).

    Before: s = Shape(W_const); y = Reshape(x, Concat(s, [-1]))
    After:  y = Reshape(x, [4096, -1])

    Args:
        output_size_limit: Largest folded result, in elements, that may become a constant.
    """

    name: ClassVar[str] = "fold-constants"
    output_size_limit: int = 1 << 20

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        before = model.graph.num_nodes()
        result = fold_constants(
            model,
            input_size_limit=self.output_size_limit,
            output_size_limit=self.output_size_limit,
            should_fold=_should_fold,
        )
        removed = before - model.graph.num_nodes()
        return PassResult(changed=bool(result.modified), stats={"folded": max(removed, 0)})


def _should_fold(node: ir.Node) -> bool | None:
    if node.op_type in KEEP_UNFOLDED or KEEP_UNFOLDED_KEY in node.metadata_props:
        return False
    return None
