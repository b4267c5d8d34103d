"""quantize-weights: round-to-nearest weight-only quantization of MatMul weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.tensors import storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.quantize.emit import replace_with_dequantized
from kompakt.passes.quantize.grid import Grid, quantize_rtn, sqnr_db
from kompakt.passes.quantize.layers import select_weights
from kompakt.passes.registry import register_pass
from kompakt.progress import progress


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Quantize MatMul weights to low-bit integers by round-to-nearest (weight-only).

    Written as standard ONNX, which ONNX Runtime fuses into MatMulNBits. Embeddings (Gather)
    are never touched; the output projection is kept in float unless keep-lm-head=false.

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(x, DequantizeLinear(Wq: u4[K, N], s: f32[K/g, N], z: u4[K/g, N],
                                           axis=0, block_size=g))

    Args:
        bits: Bits per weight: 8, 4, 3 or 2 (3 and 2 are stored in a 4-bit container).
        group_size: Rows of K sharing one scale (power of two >= 16), or -1 for one scale per
            output channel. A K that is not a multiple gets a shorter last group.
        symmetric: Signed grid with no zero point; asymmetric (uint + zero point) is more
            accurate at 4 bits and below.
        exclude: Module-path globs (or weight names) to leave in float, e.g. [*.down_proj].
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: quantize only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "quantize-weights"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.grid()  # validates bits and group size at construction, i.e. at parse time

    def grid(self) -> Grid:
        return Grid(self.bits, self.group_size, self.symmetric)

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        grid = self.grid()
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        before = after = 0.0
        for site in progress(sites, "quantize-weights", enabled=ctx.progress):
            weight = to_torch(site.weight.const_value)
            try:
                qw = quantize_rtn(weight, grid)
            except ValueError as err:
                raise KompaktError(f"cannot quantize weight of '{site.label}': {err}") from err
            k, n = weight.shape
            old_bytes = storage_bytes(site.weight.dtype, k * n)
            new_bytes = quantized_bytes(qw, grid)
            before, after = before + old_bytes, after + new_bytes
            result.records.append(
                {
                    "module": site.label,
                    "shape": [k, n],
                    "scheme": grid.describe(),
                    "bytes_before": int(old_bytes),
                    "bytes_after": int(new_bytes),
                    "sqnr_db": round(sqnr_db(weight, qw.dequantize()), 2),
                }
            )
            replace_with_dequantized(model.graph, site, qw, method="rtn")
            if grid.group_size != -1 and k > grid.group_size and k % grid.group_size:
                result.notes.append(
                    f"{site.label}: K={k} is not a multiple of {grid.group_size}; "
                    f"its last group has {k % grid.group_size} rows"
                )
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        result.stats.update(
            {
                "quantized": len(sites),
                "kept": len(skipped),
                "weight_bytes_before": int(before),
                "weight_bytes_after": int(after),
            }
        )
        return result


def quantized_bytes(qw, grid: Grid) -> float:
    total = storage_bytes(grid.storage_dtype, qw.q.numel())
    total += qw.scale.numel() * qw.scale.element_size()
    if qw.zero_point is not None:
        total += storage_bytes(grid.storage_dtype, qw.zero_point.numel())
    return total
