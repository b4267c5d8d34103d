"""gptq: weight quantization with Hessian-based error compensation (Frantar et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir

from kompakt.errors import KompaktError
from kompakt.ir.tensors import storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import replace_with_dequantized
from kompakt.passes.quantize.gptq_math import gptq_quantize, hessian_energy, rtn_hessian_error
from kompakt.passes.quantize.grid import Grid
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.quantize_weights import quantized_bytes
from kompakt.passes.registry import register_pass
from kompakt.progress import progress


@register_pass
@dataclass(frozen=True)
class Gptq(Pass):
    """Quantize MatMul weights with GPTQ: round each input channel, then correct the channels not
    yet rounded for its error, weighted by the calibration inputs' Hessian.

    Runs block by block: each block's MatMul inputs are measured on the calibration data as
    produced by the blocks already quantized, so errors do not compound unseen.

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(x, DequantizeLinear(Wq: u4[K, N], s: f32[K/g, N], z: u4[K/g, N],
                                           axis=0, block_size=g))    Wq minimizing ||xW - xŴ||

    Args:
        bits: Bits per weight: 8, 4, 3 or 2.
        group_size: Rows of K sharing one scale (power of two >= 16), or -1 per output channel.
        symmetric: Signed grid without zero point.
        act_order: Quantize input channels by decreasing activation energy (H_kk); groups keep
            their contiguous layout, with scales fixed from the original weights.
        block_size: Channels per lazy-update block (128 in the paper).
        damp: Diagonal damping, as a fraction of the mean of diag(H).
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: quantize only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "gptq"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    uses_calibration: ClassVar[bool] = True

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = True
    block_size: int = 128
    damp: float = 0.01
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Grid(self.bits, self.group_size, self.symmetric)
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive; got {self.block_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1); got {self.damp}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        grid = Grid(self.bits, self.group_size, self.symmetric)
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        result.records, result.stats = self.quantize_blockwise(
            model, ctx, {id(site.matmuls[0]): (site, grid) for site in sites}
        )
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        result.stats["kept"] = len(skipped)
        return result

    def quantize_blockwise(
        self, model: ir.Model, ctx: CompileContext, plan: dict[int, tuple[WeightSite, Grid]]
    ) -> tuple[list[dict], dict]:
        """GPTQ for each site in ``plan`` (keyed by id of its first MatMul) with its own grid,
        block by block on the calibration data. Returns per-weight records and totals; also used
        by mixed-precision, which chooses a grid per weight."""
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        pending = dict(plan)
        records = []
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]
            if not here:
                continue
            stats = stage.collect({id(site.matmuls[0].inputs[0]): {"hessian"} for site, _ in here})
            # Smallest inputs first, each Hessian dropped after its last site: the largest
            # (down_proj's, K = intermediate size) is then alone in memory while it is solved.
            here.sort(key=lambda entry: to_torch(entry[0].weight.const_value).shape[0])
            for index, (site, grid) in enumerate(here):
                key = id(site.matmuls[0].inputs[0])
                last_use = all(
                    id(other.matmuls[0].inputs[0]) != key for other, _ in here[index + 1 :]
                )
                hessian = stats.pop(key).hessian if last_use else stats[key].hessian
                runner.forget(site.weight)
                records.append(self._quantize(model.graph, site, hessian, grid, last_use))
                del hessian
        totals = {
            "quantized": len(plan),
            "calibration_batches": len(feeds),
            "calibration_tokens": sum(next(iter(f.values())).numel() for f in feeds),
        }
        return records, totals

    def _quantize(self, graph: ir.Graph, site, hessian, grid: Grid, owned: bool) -> dict:
        weight = to_torch(site.weight.const_value)
        # Both error measures need the intact H, which the solver may then reuse as scratch.
        signal = hessian_energy(weight, hessian) or 1.0
        rtn_error = rtn_hessian_error(weight, grid, hessian)
        try:
            qw, loss = gptq_quantize(
                weight,
                hessian,
                grid,
                self.block_size,
                self.damp,
                self.act_order,
                overwrite_hessian=owned,
            )
        except ValueError as err:
            raise KompaktError(f"gptq cannot quantize '{site.label}': {err}") from err
        k, n = weight.shape
        record = {
            "module": site.label,
            "shape": [k, n],
            "scheme": f"{grid.describe()} gptq",
            "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
            "bytes_after": int(quantized_bytes(qw, grid)),
            "output_error": round(loss / signal, 6),  # GPTQ's own loss, under the damped H
            "rtn_output_error": round(rtn_error, 6),
        }
        replace_with_dequantized(graph, site, qw, method="gptq")
        return record
