"""mixed-precision: bits per layer chosen from measured sensitivity, under an average-bits budget.

HAWQ (Dong et al., 2019; HAWQ-V2, 2020; HAWQ-V3's integer program, 2021) ranks layers by how much
the loss grows when each is quantized, Ω_i(b) ≈ ½ tr(H_i)/n_i · ||Q_b(W_i) − W_i||², and gives the
most sensitive layers more bits under a size budget. Two ways to measure Ω here:

- ``sensitivity=hessian`` (block by block, any depth, cheapest): the layer's own output error on
  the calibration tokens, Ω_i(b) = tr(Δᵀ H Δ) with H = E[xᵀx] and Δ = W − Q_b(W). This is the
  second-order term HAWQ uses with the layer-input Hessian in place of the loss Hessian (which a
  compiler pass cannot compute without gradients).
- ``sensitivity=block`` (default): the error of the enclosing block's outputs (the residual
  stream, each output relative to its own size), with only that layer quantized, block by block
  on the calibration data as produced by the float blocks before it. A layer's own output error
  (hessian) is in that layer's units, which differ between, say, q_proj and down_proj; the
  block's output puts every layer of the block on one scale. Measured better on MiniLM (cosine
  0.9893 vs 0.9853 at 4.5 bits) and a tie on the tiny LM (benchmarks/RESULTS.md);
- ``sensitivity=output``: the measured error of the whole model's output on the calibration data
  with only that layer quantized to b bits (mean squared error over the output's variance); the
  most direct measure, at one full forward pass per layer and width — for models that fit.

Both assume the per-layer losses add up, as HAWQ does. The allocation minimizes Σ_i Ω_i(b_i)
subject to Σ_i b_i·n_i ≤ average_bits·Σ_i n_i (n_i = parameters of layer i): starting from the
narrowest width, repeatedly take the upgrade with the largest loss reduction per extra bit that
still fits (a greedy solution of HAWQ-V3's knapsack; exact when the loss-vs-bits curves are
convex). Then each layer is quantized to its width with ``method`` (GPTQ by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.tensors import from_torch, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import replace_with_dequantized
from kompakt.passes.quantize.gptq import Gptq
from kompakt.passes.quantize.gptq_math import hessian_energy
from kompakt.passes.quantize.grid import SUPPORTED_BITS, Grid, quantize_rtn
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.quantize_weights import quantized_bytes
from kompakt.passes.registry import register_pass
from kompakt.progress import progress
from kompakt.runtime.plan import ExecutionPlan

SENSITIVITIES = ("hessian", "block", "output")
METHODS = ("gptq", "rtn")


@register_pass
@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Quantize weights to a different width per layer: the layers whose error costs most get
    more bits, within an average-bits budget (HAWQ-style sensitivity, greedy knapsack).

    Before: y_i = MatMul(x_i, W_i: f32[K_i, N_i])                    for every layer i
    After:  y_i = MatMul(x_i, DequantizeLinear(W_i: b_i bits, ...))  Σ b_i·|W_i| ≤ B·Σ |W_i|

    The chosen widths are in the report (the scheme column) and in the pass's records.

    Args:
        average_bits: Budget B: mean bits per weight value over the quantized layers (scales and
            zero points not counted: every width carries the same per-group overhead).
        candidates: Widths a layer may get (from 2, 3, 4, 8). The default, 4 and 8, measured
            best in the accuracy harness: with 3 in the set, the layer-output sensitivity sends
            layers to 3 bits whose error costs more downstream than it predicts.
        group_size: Rows of K sharing one scale (power of two >= 16), or -1 per output channel.
        symmetric: Signed grid without zero point.
        method: How each layer is quantized once its width is chosen: gptq or rtn.
        sensitivity: hessian (layer output error), block (block output error with one layer
            quantized; one block run per layer and width) or output (whole-model output error
            with one layer quantized; one forward pass per layer and width).
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: quantize only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "mixed-precision"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    uses_calibration: ClassVar[bool] = True

    average_bits: float = 4.5
    candidates: tuple[int, ...] = (4, 8)
    group_size: int = 128
    symmetric: bool = False
    method: str = "gptq"
    sensitivity: str = "block"
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.candidates or any(b not in SUPPORTED_BITS for b in self.candidates):
            raise ValueError(
                f"candidates must be widths from {SUPPORTED_BITS}; got {list(self.candidates)}"
            )
        for bits in self.candidates:
            Grid(bits, self.group_size, self.symmetric)
        low, high = min(self.candidates), max(self.candidates)
        if not low <= self.average_bits <= high:
            raise ValueError(
                f"average_bits must lie between the narrowest and widest candidate ({low}..{high}); "
                f"got {self.average_bits}"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got '{self.method}'")
        if self.sensitivity not in SENSITIVITIES:
            raise ValueError(
                f"sensitivity must be one of {', '.join(SENSITIVITIES)}; got '{self.sensitivity}'"
            )

    def grids(self) -> dict[int, Grid]:
        return {b: Grid(b, self.group_size, self.symmetric) for b in sorted(set(self.candidates))}

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        if not sites:
            result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
            return result
        measure = {
            "hessian": self._hessian_losses,
            "block": self._block_losses,
            "output": self._output_losses,
        }[self.sensitivity]
        losses = measure(model, ctx, sites)
        sizes = [to_torch(site.weight.const_value).numel() for site in sites]
        widths = allocate_bits(losses, sizes, sorted(set(self.candidates)), self.average_bits)
        grids = self.grids()
        chosen = {
            id(site.matmuls[0]): (site, grids[b]) for site, b in zip(sites, widths, strict=True)
        }
        if self.method == "gptq":
            gptq = Gptq(group_size=self.group_size, symmetric=self.symmetric)
            records, totals = gptq.quantize_blockwise(model, ctx, chosen)
        else:
            records, totals = [_rtn(model.graph, site, grid) for site, grid in chosen.values()], {}
        by_module = {site.label: i for i, site in enumerate(sites)}
        for record in records:
            i = by_module[record["module"]]
            record["bits"] = widths[i]
            record["sensitivity"] = {str(b): _round(loss) for b, loss in losses[i].items()}
        result.records = sorted(records, key=lambda r: by_module[r["module"]])
        average = sum(b * n for b, n in zip(widths, sizes, strict=True)) / sum(sizes)
        result.stats.update(
            {
                "quantized": len(sites),
                "kept": len(skipped),
                "average_bits": round(average, 3),
                **{f"layers_w{b}": widths.count(b) for b in sorted(set(widths))},
                **{k: v for k, v in totals.items() if k != "quantized"},
            }
        )
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        return result

    def _stages_with_sites(self, model: ir.Model, ctx: CompileContext, sites: list[WeightSite]):
        """Yields (stage, indices of ``sites`` in it) for the stages holding any, on the
        float model, block by block."""
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        pending = {id(site.matmuls[0]): i for i, site in enumerate(sites)}
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages(),
            f"{self.name} (sensitivity)",
            enabled=ctx.progress,
            total=runner.num_stages(),
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]
            if here:
                yield stage, here

    def _hessian_losses(
        self, model: ir.Model, ctx: CompileContext, sites: list[WeightSite]
    ) -> list[dict[int, float]]:
        """tr(ΔᵀHΔ) per site and width, measured block by block on the float model."""
        losses: list[dict[int, float]] = [{} for _ in sites]
        for stage, here in self._stages_with_sites(model, ctx, sites):
            stats = stage.collect({id(sites[i].matmuls[0].inputs[0]): {"hessian"} for i in here})
            for i in here:
                hessian = stats[id(sites[i].matmuls[0].inputs[0])].hessian
                weight = to_torch(sites[i].weight.const_value).float()
                for bits, grid in self.grids().items():
                    delta = weight - quantize_rtn(weight, grid).dequantize().float()
                    losses[i][bits] = hessian_energy(delta, hessian)
            del stats
        return losses

    def _block_losses(
        self, model: ir.Model, ctx: CompileContext, sites: list[WeightSite]
    ) -> list[dict[int, float]]:
        """Error of each block's outputs with one of its weights quantized, per site and width."""
        losses: list[dict[int, float]] = [{} for _ in sites]
        for stage, here in self._stages_with_sites(model, ctx, sites):
            runner = stage.runner
            outputs = _stage_outputs(model.graph, stage.nodes)
            reference = []
            for env in runner.envs:
                scratch = dict(env)
                runner.run_nodes(stage.nodes, scratch)
                reference.append([scratch[id(v)] for v in outputs])
            floating = [i for i, t in enumerate(reference[0]) if t.is_floating_point()]
            outputs = [outputs[i] for i in floating]
            reference = [[ref[i].float() for i in floating] for ref in reference]
            # each output's error relative to its own size (a causal mask among the outputs holds
            # -3.4e38 and would swamp one shared scale); outputs no weight affects add nothing
            sizes = [
                sum(float(ref[o].pow(2).mean()) for ref in reference) for o in range(len(outputs))
            ]
            for i in here:
                weight = to_torch(sites[i].weight.const_value)
                for bits, grid in self.grids().items():
                    trial = quantize_rtn(weight, grid).dequantize().to(weight.dtype)
                    error = 0.0
                    for env, ref in zip(runner.envs, reference, strict=True):
                        scratch = dict(env)
                        scratch[id(sites[i].weight)] = trial
                        runner.run_nodes(stage.nodes, scratch)
                        error += sum(
                            float((scratch[id(v)].float() - r).pow(2).mean()) / size
                            for v, r, size in zip(outputs, ref, sizes, strict=True)
                            if 0 < size < math.inf
                        )
                    losses[i][bits] = error
            del reference
        return losses

    def _output_losses(
        self, model: ir.Model, ctx: CompileContext, sites: list[WeightSite]
    ) -> list[dict[int, float]]:
        """Whole-model output error with one site quantized, per site and width."""
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        reference = [_outputs(model, feed) for feed in feeds]
        variance = sum(float(r.var()) for ref in reference for r in ref) or 1.0
        losses: list[dict[int, float]] = [{} for _ in sites]
        steps = [(i, b, g) for i in range(len(sites)) for b, g in self.grids().items()]
        for i, bits, grid in progress(steps, f"{self.name} (sensitivity)", enabled=ctx.progress):
            site = sites[i]
            original = site.weight.const_value
            weight = to_torch(original)
            site.weight.const_value = from_torch(
                quantize_rtn(weight, grid).dequantize().to(weight.dtype), name=site.weight.name
            )
            try:
                error = sum(
                    float((o - r).pow(2).mean())
                    for feed, ref in zip(feeds, reference, strict=True)
                    for o, r in zip(_outputs(model, feed), ref, strict=True)
                )
            finally:
                site.weight.const_value = original
            if not math.isfinite(error):
                raise KompaktError(
                    f"mixed-precision: quantizing '{site.label}' to {bits} bits made the output "
                    "non-finite on the calibration data"
                )
            losses[i][bits] = error / variance
        return losses


def allocate_bits(
    losses: list[dict[int, float]], sizes: list[int], widths: list[int], average_bits: float
) -> list[int]:
    """Width per layer minimizing Σ loss within Σ width·size ≤ average_bits·Σ size (greedy by
    loss reduction per extra bit over each layer's lower convex hull of loss vs width)."""
    budget = average_bits * sum(sizes) + 1e-6
    hulls = [_lower_hull(widths, loss) for loss in losses]
    position = [0] * len(sizes)  # index into each layer's hull
    spent = sum(hull[0][0] * n for hull, n in zip(hulls, sizes, strict=True))
    while True:
        best, best_gain = None, 0.0
        for i, (hull, n) in enumerate(zip(hulls, sizes, strict=True)):
            if position[i] + 1 >= len(hull):
                continue
            (b0, l0), (b1, l1) = hull[position[i]], hull[position[i] + 1]
            cost = (b1 - b0) * n
            gain = (l0 - l1) / cost
            if spent + cost <= budget and (best is None or gain > best_gain):
                best, best_gain = i, gain
        if best is None:
            break
        hull = hulls[best]
        spent += (hull[position[best] + 1][0] - hull[position[best]][0]) * sizes[best]
        position[best] += 1
    return [hull[p][0] for hull, p in zip(hulls, position, strict=True)]


def _lower_hull(widths: list[int], loss: dict[int, float]) -> list[tuple[int, float]]:
    """The widths worth stopping at: losses that decrease, with diminishing returns per bit."""
    points = [(b, loss[b]) for b in widths]
    hull: list[tuple[int, float]] = []
    for b, value in points:
        if hull and value >= hull[-1][1]:
            continue  # wider but not better: never chosen
        while len(hull) >= 2:
            (b0, l0), (b1, l1) = hull[-2], hull[-1]
            if (l0 - l1) / (b1 - b0) <= (l1 - value) / (b - b1):
                hull.pop()  # the middle point is not on the convex hull
            else:
                break
        hull.append((b, value))
    return hull


def _stage_outputs(graph: ir.Graph, nodes: list[ir.Node]) -> list[ir.Value]:
    """Values the stage computes that something after it (or the graph) reads."""
    inside = {id(n) for n in nodes}
    graph_outputs = {id(v) for v in graph.outputs}
    found = []
    for node in nodes:
        for value in node.outputs:
            if id(value) in graph_outputs or any(id(u.node) not in inside for u in value.uses()):
                found.append(value)
    return found


def _outputs(model: ir.Model, feed) -> list[torch.Tensor]:
    return [o.float() for o in ExecutionPlan(model).run(dict(feed))]


def _rtn(graph: ir.Graph, site: WeightSite, grid: Grid) -> dict:
    weight = to_torch(site.weight.const_value)
    qw = quantize_rtn(weight, grid)
    k, n = weight.shape
    record = {
        "module": site.label,
        "shape": [k, n],
        "scheme": grid.describe(),
        "bytes_before": int(weight.numel() * weight.element_size()),
        "bytes_after": int(quantized_bytes(qw, grid)),
    }
    replace_with_dequantized(graph, site, qw, method="rtn")
    return record


def _round(value: float) -> float:
    return float(f"{value:.4g}")
