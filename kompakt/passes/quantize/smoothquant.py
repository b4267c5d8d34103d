"""smoothquant: migrate activation outliers into the weights (Xiao et al., 2022, sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.tensors import from_torch, storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner, Stage
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.scale_folding import divide_input
from kompakt.passes.quantize.smoothquant_math import (
    channel_spread,
    per_tensor_scale,
    smoothing_scales,
    w8a8_error,
)
from kompakt.passes.registry import register_pass
from kompakt.progress import progress

ERROR_ROWS = 512
"""Calibration token rows (evenly spaced) the per-site W8A8 error estimate is measured on."""
ALPHA_GRID = tuple(i / 10 for i in range(11))
"""Migration strengths the search tries per input (0, 0.1, ..., 1)."""


@register_pass
@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Smooth MatMul inputs for int8 activations (SmoothQuant): shift outlier ranges to weights.

    Each input channel j is divided by s_j and the weights' row j multiplied by it, with
    s_j = max|X_j|^α / max|W_j,:|^(1-α), so outlier channels shrink. The function is unchanged in float; what changes is that a per-tensor int8 scale for X no
    longer has to cover a few channels hundreds of times larger than the rest (SmoothQuant,
    Xiao et al., 2022, sec. 4). MatMuls reading one input (q/k/v; gate/up) share s. The division
    is folded into the op before (LayerNorm, RMSNorm's weight, a MatMul's columns) when that op
    is in the same block and feeds nothing else, else an explicit Mul goes in. Run it before
    quantize-weights and quantize-activations.

    Before: y = MatMul(LayerNorm(h; γ, β), W)
    After:  y = MatMul(LayerNorm(h; γ / s, β / s), diag(s) W)

    Args:
        alpha: Migration strength α in [0, 1]: at 1 every input channel ends with range 1 (all
            variation moved into the weights), at 0 every weight row does; 0.5 (the paper's
            default) balances the two.
        search: Per input, pick α from 0, 0.1, ..., 1 (or no smoothing at all) by the simulated
            W8A8 output error (per-tensor int8 input, per-channel int8 weights) on calibration
            rows, instead of using alpha everywhere. Off by default: on all-MiniLM-L6-v2 it
            gives cosine 0.99846 (dynamic) / 0.99719 (static) against 0.99898 / 0.99766 for a
            fixed α of 0.5 / 0.8 (the per-layer error does not see how errors compound).
        exclude: Module-path globs (or weight names) to leave unsmoothed.
        keep_lm_head: Leave the output projection's input unsmoothed (it stays float anyway by
            default in quantize-weights).
    """

    name: ClassVar[str] = "smoothquant"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"smoothed"})
    uses_calibration: ClassVar[bool] = True

    alpha: float = 0.5
    search: bool = False
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head)
        result = PassResult(changed=bool(sites))
        pending = {id(site.matmuls[0]): site for site in sites}
        folds: dict[str, int] = {}
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]
            if here:
                self._stage(model.graph, stage, here, result, folds)
        result.notes += [f"{s.label}: not smoothed ({s.reason})" for s in skipped]
        if not sites:
            result.notes.append(
                "no float MatMul weight to smooth (run smoothquant before quantizing)"
            )
        result.stats.update(
            {"smoothed": len(sites), "kept": len(skipped), "calibration_batches": len(feeds)}
        )
        result.stats.update({f"input_scales {k}": v for k, v in sorted(folds.items())})
        return result

    def _stage(self, graph: ir.Graph, stage: Stage, sites, result: PassResult, folds) -> None:
        groups: dict[int, list[WeightSite]] = {}
        for site in sites:  # MatMuls that read the same activation share one s
            groups.setdefault(id(site.matmuls[0].inputs[0]), []).append(site)
        # Checked before running the stage: a NaN weight would otherwise surface as NaN in the
        # next MatMul's input, naming the wrong layer.
        originals = {id(site): _float_weight(site) for site in sites}
        stats = stage.collect({key: {"absmax", "samples"} for key in groups})
        # 1. Every s from the original weights first: a fold may rescale another group's weight
        #    (down_proj's s goes into up_proj's columns), which must not change up_proj's s.
        plans = []
        for key, members in groups.items():
            weights = [originals[id(site)] for site in members]
            absmax = stats[key].absmax
            x = _spread(stats[key].samples, ERROR_ROWS)
            before = w8a8_error(x, weights, per_tensor_scale(absmax))
            alpha, s, after = None, torch.ones_like(absmax), before
            for candidate in ALPHA_GRID if self.search else (self.alpha,):
                scales = smoothing_scales(absmax, weights, candidate)
                error = w8a8_error(
                    x / scales,
                    [w * scales[:, None] for w in weights],
                    per_tensor_scale(absmax / scales),
                )
                if not self.search or error < after:
                    alpha, s, after = candidate, scales, error
            spread = (channel_spread(absmax), channel_spread(absmax / s))
            plans.append((members, alpha, s, spread, before, after))
        # 2. Apply: weights' rows times s (read now: an earlier fold may have scaled columns).
        allowed = {id(n) for n in stage.nodes}
        for members, alpha, s, spread, before, after in plans:
            if alpha is None:  # the search found no α that lowers this input's W8A8 error
                folds["not smoothed"] = folds.get("not smoothed", 0) + 1
                result.records += [
                    _record(site, None, spread, before, after, "not smoothed") for site in members
                ]
                continue
            for site in members:
                weight = to_torch(site.weight.const_value)
                scaled = (weight.float() * s[:, None]).to(weight.dtype)
                site.weight.const_value = from_torch(scaled, name=site.weight.name)
            consumers = [m for site in members for m in site.matmuls]
            how = divide_input(graph, members[0].matmuls[0].inputs[0], s, consumers, allowed)
            folds[how] = folds.get(how, 0) + 1
            result.records += [_record(site, alpha, spread, before, after, how) for site in members]


def _record(site: WeightSite, alpha, spread, before: float, after: float, how: str) -> dict:
    k, n = site.weight.const_value.shape
    size = int(storage_bytes(site.weight.dtype, k * n))
    return {
        "module": site.label,
        "shape": [k, n],
        "scheme": "unsmoothed" if alpha is None else f"smooth α={alpha:g}",
        "bytes_before": size,
        "bytes_after": size,
        "alpha": alpha,
        "act_spread_before": round(spread[0], 2),
        "act_spread_after": round(spread[1], 2),
        # of the group sharing this input: simulated W8A8 (static per-tensor activations,
        # per-channel weights) relative output error vs float, on calibration rows
        "w8a8_error_before": round(before, 6),
        "w8a8_error_after": round(after, 6),
        "input_scale": how,
    }


def _float_weight(site: WeightSite) -> torch.Tensor:
    weight = to_torch(site.weight.const_value).float()
    if not torch.isfinite(weight).all():
        raise KompaktError(f"smoothquant cannot smooth '{site.label}': weight contains NaN or Inf")
    return weight


def _spread(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` rows, evenly spaced."""
    if rows.shape[0] <= limit:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, limit).long()]
