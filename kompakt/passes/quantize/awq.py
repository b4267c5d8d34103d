"""awq: activation-aware weight quantization (Lin et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.ir.metadata import module_of
from kompakt.ir.tensors import from_torch, storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner, Stage
from kompakt.passes.quantize.awq_math import linear_error, search_clip, search_scales
from kompakt.passes.quantize.emit import replace_with_dequantized
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.quantize_weights import quantized_bytes
from kompakt.passes.quantize.scale_folding import divide_input
from kompakt.passes.registry import register_pass
from kompakt.progress import progress


@register_pass
@dataclass(frozen=True)
class Awq(Pass):
    """Quantize MatMul weights with AWQ: scale up the input channels that carry large activations
    before rounding (the inverse scale folded into the op before, where possible), and clip each
    group's weight range where that lowers the output error.

    Before: y = MatMul(RMSNorm(h) ⊙ g, W)
    After:  y = MatMul(RMSNorm(h) ⊙ (g / s), DequantizeLinear(Q(clip(diag(s) W)), ...))

    Args:
        bits: Bits per weight: 8, 4, 3 or 2.
        group_size: Rows of K sharing one scale (power of two >= 16), or -1 per output channel.
        symmetric: Signed grid without zero point.
        clip: Search a clipping range per group and output channel.
        search_tokens: Calibration tokens the scale search measures module outputs on (the
            leading batches that hold this many). The paper uses its whole calibration set
            (65k tokens); on kompakt's tiny LM 16k already gives the same result, 512 a worse one.
        clip_tokens: Tokens the clipping search uses (evenly spaced; 512 in the paper).
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: quantize only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "awq"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    uses_calibration: ClassVar[bool] = True

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip: bool = True
    search_tokens: int = 16384
    clip_tokens: int = 512
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        Grid(self.bits, self.group_size, self.symmetric)
        if self.search_tokens < 1 or self.clip_tokens < 1:
            raise ValueError("search_tokens and clip_tokens must be positive")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        grid = Grid(self.bits, self.group_size, self.symmetric)
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        pending = {id(site.matmuls[0]): site for site in sites}
        folds: dict[str, int] = {}
        runner = BlockwiseRunner(model, feeds)
        keep = _batches_covering(feeds, self.search_tokens)
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]
            if here:
                self._stage(model.graph, runner, stage, here, grid, result, folds, keep)
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        result.stats.update(
            {"quantized": len(sites), "kept": len(skipped), "calibration_batches": len(feeds)}
        )
        result.stats.update({f"input_scales {k}": v for k, v in sorted(folds.items())})
        return result

    def _stage(
        self, graph, runner, stage: Stage, sites, grid: Grid, result, folds, keep: int
    ) -> None:
        groups: dict[int, list[WeightSite]] = {}
        for site in sites:  # MatMuls that read the same activation share one scale
            groups.setdefault(id(site.matmuls[0].inputs[0]), []).append(site)
        scopes = {key: module_scope(stage.nodes, members) for key, members in groups.items()}
        requests: dict[int, set[str]] = {key: {"absmean", "samples"} for key in groups}
        for scope in scopes.values():
            for value in scope.inputs if scope else ():
                requests.setdefault(id(value), set()).add("tensors")
        stats = stage.collect(requests, keep_batches=keep)
        allowed = {id(n) for n in stage.nodes}
        plans = []
        # 1. All scales first, on the float weights: a fold may rescale another site's weight
        #    (down_proj's scale goes into up_proj), which must happen before that one is rounded.
        for key, members in groups.items():
            x = stats[key].samples
            weights = [to_torch(site.weight.const_value) for site in members]
            scope = scopes[key]
            if scope is None:
                error_of = linear_error(x, weights)
            else:
                error_of = scope_error(runner, scope, stats, [site.weight for site in members])
            s, alpha, _, _ = search_scales(weights, stats[key].absmean, grid, error_of)
            for site, weight in zip(members, weights, strict=True):
                scaled = (weight.float() * s[:, None]).to(weight.dtype)
                site.weight.const_value = from_torch(scaled, name=site.weight.name)
            consumers = [m for site in members for m in site.matmuls]
            how = divide_input(graph, members[0].matmuls[0].inputs[0], s, consumers, allowed)
            folds[how] = folds.get(how, 0) + 1
            plans += [(site, _spread(x, self.clip_tokens), s, alpha) for site in members]
        # The next stage is calibrated on this stage's float outputs (scales applied, weights
        # not yet rounded), as AWQ's reference implementation propagates them.
        stage.forward_now()
        # 2. Clip and round every weight of the stage.
        for site, x, s, alpha in plans:
            weight = to_torch(site.weight.const_value)  # scaled; maybe also rescaled by a fold
            x_scaled = x / s
            clipped = search_clip(weight, x_scaled, grid) if self.clip else weight
            qw = quantize_rtn(clipped, grid)
            reference = x_scaled @ weight.float()
            signal = float(reference.pow(2).mean()) or 1.0
            final_error = float((x_scaled @ qw.dequantize().float() - reference).pow(2).mean())
            unscaled = weight.float() / s[:, None]  # what plain RTN would have rounded
            rtn = quantize_rtn(unscaled, grid).dequantize().float()
            rtn_error = float((x @ rtn - reference).pow(2).mean())
            k, n = weight.shape
            result.records.append(
                {
                    "module": site.label,
                    "shape": [k, n],
                    "scheme": f"{grid.describe()} awq",
                    "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
                    "bytes_after": int(quantized_bytes(qw, grid)),
                    "alpha": alpha,
                    "output_error": round(final_error / signal, 6),
                    "rtn_output_error": round(rtn_error / signal, 6),
                }
            )
            replace_with_dequantized(graph, site, qw, method="awq")


@dataclass
class Scope:
    """The module AWQ inspects for a group of MatMuls: its nodes, the values it reads from
    outside (constants aside), and the values others read from it."""

    nodes: list[ir.Node]
    inputs: list[ir.Value]
    outputs: list[ir.Value]


def module_scope(stage_nodes: list[ir.Node], members: list[WeightSite]) -> Scope | None:
    """The smallest module containing every MatMul of the group (``model.layers.3.self_attn``
    for q/k/v, ``...mlp`` for gate/up); None for a MatMul that is a module on its own."""
    matmuls = [m for site in members for m in site.matmuls]
    paths = [module_of(m).split(".") for m in matmuls]
    common: list[str] = []
    for parts in zip(*paths, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(matmuls) < 2 or not common or not all(paths):
        return None
    prefix = ".".join(common)
    nodes = [
        n for n in stage_nodes if module_of(n) == prefix or module_of(n).startswith(prefix + ".")
    ]
    inside = {id(n) for n in nodes}
    produced = {id(v) for n in nodes for v in n.outputs}
    inputs: dict[int, ir.Value] = {}
    for node in nodes:
        for value in node.inputs:
            if value is not None and id(value) not in produced and value.const_value is None:
                inputs.setdefault(id(value), value)
    outputs = [
        v
        for n in nodes
        for v in n.outputs
        if v.is_graph_output() or any(id(u.node) not in inside for u in v.uses())
    ]
    return Scope(nodes, list(inputs.values()), outputs) if outputs else None


def scope_error(runner: BlockwiseRunner, scope: Scope, stats, weight_values: list[ir.Value]):
    """Mean squared error of the scope's outputs with candidate weights, over the kept batches."""
    kept = min(len(stats[id(v)].tensors) for v in scope.inputs)
    batches = [{id(v): stats[id(v)].tensors[b] for v in scope.inputs} for b in range(kept)]
    references = []
    for env in batches:
        run = dict(env)
        runner.run_nodes(scope.nodes, run)
        references.append([run[id(o)].float() for o in scope.outputs])
    dtypes = [to_torch(v.const_value).dtype for v in weight_values]

    def error_of(candidates: list[torch.Tensor]) -> float:
        total = 0.0
        for env, reference in zip(batches, references, strict=True):
            run = dict(env)
            run.update(
                {id(v): c.to(d) for v, c, d in zip(weight_values, candidates, dtypes, strict=True)}
            )
            runner.run_nodes(scope.nodes, run)
            total += sum(
                float((run[id(o)].float() - r).pow(2).mean())
                for o, r in zip(scope.outputs, reference, strict=True)
            )
        return total

    return error_of


def _batches_covering(feeds, tokens: int) -> int:
    """How many leading calibration batches hold at least ``tokens`` tokens (all if fewer)."""
    seen = 0
    for count, feed in enumerate(feeds, start=1):
        seen += next(iter(feed.values())).numel()
        if seen >= tokens:
            return count
    return len(feeds)


def _spread(rows: torch.Tensor, limit: int) -> torch.Tensor:
    """At most ``limit`` rows, evenly spaced."""
    if rows.shape[0] <= limit:
        return rows
    return rows[torch.linspace(0, rows.shape[0] - 1, limit).long()]
