"""A pass written outside kompakt, registered, and run by name in a pipeline string.

    python examples/custom_pass.py

`ZeroSmallWeights` zeroes MatMul weight entries whose magnitude is below a threshold (a toy
magnitude pruning). To ship a pass in your own package, register it through the entry-point
group instead of the decorator:

    [project.entry-points."kompakt.passes"]
    zero-small-weights = "my_package.passes:ZeroSmallWeights"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

import kompakt
from kompakt.ir import from_torch, to_torch
from kompakt.passes.quantize.layers import select_weights


@kompakt.register_pass
@dataclass(frozen=True)
class ZeroSmallWeights(kompakt.Pass):
    """Zero the entries of MatMul weights whose magnitude is below `threshold`.

    Before: y = MatMul(x, W)
    After:  y = MatMul(x, W * (|W| >= threshold))

    Args:
        threshold: Entries with |w| below this become exactly zero.
    """

    name: ClassVar[str] = "zero-small-weights"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    threshold: float = 0.01

    def run(self, model: ir.Model, ctx: kompakt.CompileContext) -> kompakt.PassResult:
        sites, _ = select_weights(model.graph, keep_lm_head=False)
        zeroed = total = 0
        for site in sites:
            weight = to_torch(site.weight.const_value)
            keep = weight.abs() >= self.threshold
            zeroed += int((~keep).sum())
            total += weight.numel()
            site.weight.const_value = from_torch(
                torch.where(keep, weight, 0), name=site.weight.name
            )
        return kompakt.PassResult(changed=zeroed > 0, stats={"zeroed": zeroed, "of": total})


def main() -> kompakt.CompiledModel:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)
    ).eval()
    x = torch.randn(4, 64)
    compiled = kompakt.compile(
        model,
        example_inputs=(x,),
        target="cpu",
        pipeline="canonicalize,zero-small-weights{threshold=0.02}",
    )
    with torch.no_grad():
        error = (compiled(x) - model(x)).abs().max().item()
    print(compiled.report())
    print(f"\nmax abs difference vs the original model: {error:.4f}")
    return compiled


if __name__ == "__main__":
    main()
