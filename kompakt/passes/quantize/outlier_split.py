"""outlier-split: keep outliers in float, quantize the rest (LLM.int8() and SpQR)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import constant, unique_name
from kompakt.ir.metadata import copy_module
from kompakt.ir.tensors import storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import QUANT_KEY, replace_with_dequantized
from kompakt.passes.quantize.gptq_math import hessian_error
from kompakt.passes.quantize.grid import Grid, quantize_rtn
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.outlier_split_math import (
    SparseQuantized,
    outlier_channels,
    split_rows,
    spqr_quantize,
)
from kompakt.passes.quantize.quantize_weights import quantized_bytes
from kompakt.passes.registry import register_pass
from kompakt.progress import progress

KINDS = ("activation", "weight")
INT8 = Grid(8, -1, True)  # LLM.int8()'s vector-wise weights: one absmax scale per output channel
_ACTIVATION_ONLY = ("threshold", "max_outlier_fraction")
_WEIGHT_ONLY = ("bits", "group_size", "symmetric", "outlier_fraction", "block_size", "damp")


@register_pass
@dataclass(frozen=True)
class OutlierSplit(Pass):
    """Keep outliers in float and quantize the rest: LLM.int8()'s outlier input channels
    (kind=activation) or SpQR's sparse outlier weights (kind=weight).

    kind=activation, LLM.int8() (Dettmers et al., 2022, sec. 3.2): input channels whose max |x| on
    the calibration data exceeds `threshold` keep their rows of W in float; the other rows are
    int8, one absmax scale per output channel. The outlier channels are chosen once, from the
    calibration data (the paper decides per batch at run time; its outlier features are
    systematic, the same few channels in every token, sec. 4). Activations stay float here: a later
    quantize-activations pass finds the int8 MatMul by its DequantizeLinear weight. A weight with
    no outlier channel is only int8-quantized (no split).

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = Add(MatMul(Gather(x, O, axis=-1), W[O]: f32[|O|, N]),
                    MatMul(Gather(x, R, axis=-1), DequantizeLinear(Wq: i8[|R|, N], s: f32[N],
                                                                   axis=1)))

    kind=weight, SpQR (Dettmers et al., 2023, sec. 4, Algorithm 1): GPTQ's column-by-column
    solver with error compensation on small groups, whose scale and zero point ignore the
    outliers; at most `outlier_fraction` of the weights, those with the largest leave-one-out
    sensitivity (rounding error weighted by 1 / [H^-1]_kk^2), are kept in float16. Scales are
    float16 (the paper compresses them further to 3 bits, which ONNX cannot express); 3-bit
    values sit in a 4-bit container, so bits=3 saves no bytes over bits=4, only accuracy.
    Bytes per outlier: 8 (int64 flat index, what ScatterND takes) + 2 (float16 value).

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(x, Cast(Reshape(ScatterND(Reshape(DequantizeLinear(Wq: u4[K, N],
                s: f16[K/g, N], z: u4[K/g, N], axis=0, block_size=g), [-1]),
                idx: i64[nnz, 1], v: f16[nnz]), [K, N]), to=f32))

    Both kinds run block by block on the calibration data, as gptq does, so each block is
    measured with the blocks before it already quantized. Options of the other kind must be left
    at their defaults.

    Args:
        kind: "activation" (LLM.int8() outlier channels) or "weight" (SpQR outlier weights).
        threshold: kind=activation: an input channel with max |x| above this is an outlier (6.0
            in the paper).
        max_outlier_fraction: kind=activation: at most this fraction of a MatMul's input
            channels go to float; if more exceed the threshold, the loudest are kept in float and
            the rest int8 (the report notes how many).
        bits: kind=weight: bits per weight, 4, 3 or 2 (8 also works).
        group_size: kind=weight: rows of K sharing one scale, a power of two >= 16 (16 in the
            paper; smaller groups fit tighter around the weights, each costs 2.5 bytes per
            output column).
        symmetric: kind=weight: signed grid without zero point.
        outlier_fraction: kind=weight: at most this fraction of each weight's entries is kept in
            float16 (about 1% in the paper).
        block_size: kind=weight: channels per lazy-update block of the GPTQ solver.
        damp: kind=weight: diagonal damping of the Hessian, as a fraction of its mean diagonal.
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: compress only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "outlier-split"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    uses_calibration: ClassVar[bool] = True

    kind: str = "activation"
    threshold: float = 6.0
    max_outlier_fraction: float = 0.05
    bits: int = 4
    group_size: int = 16
    symmetric: bool = False
    outlier_fraction: float = 0.01
    block_size: int = 128
    damp: float = 0.01
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        other = _WEIGHT_ONLY if self.kind == "activation" else _ACTIVATION_ONLY
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for option in other:
            if getattr(self, option) != defaults[option]:
                raise ValueError(
                    f"{option} applies to kind={'weight' if self.kind == 'activation' else 'activation'}"
                    f" only, not kind={self.kind}"
                )
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive; got {self.threshold}")
        if not 0 <= self.max_outlier_fraction < 1:
            raise ValueError(
                f"max_outlier_fraction must be in [0, 1); got {self.max_outlier_fraction}"
            )
        Grid(self.bits, self.group_size, self.symmetric)
        if self.group_size == -1:
            raise ValueError("group_size must be a power of two >= 16 for kind=weight; got -1")
        if not 0 <= self.outlier_fraction < 1:
            raise ValueError(f"outlier_fraction must be in [0, 1); got {self.outlier_fraction}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive; got {self.block_size}")
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1); got {self.damp}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        pending = {id(site.matmuls[0]): site for site in sites}
        kinds = {"absmax", "samples"} if self.kind == "activation" else {"hessian"}
        gathers: dict[tuple, tuple[ir.Value, ir.Value]] = {}
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]  # graph order
            if not here:
                continue
            stats = stage.collect({id(site.matmuls[0].inputs[0]): set(kinds) for site in here})
            for site in here:
                stat = stats[id(site.matmuls[0].inputs[0])]
                if self.kind == "activation":
                    record = self._split(model.graph, site, stat, gathers, result)
                else:
                    record = self._sparse(model.graph, site, stat.hessian)
                result.records.append(record)
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        before = sum(r["bytes_before"] for r in result.records)
        after = sum(r["bytes_after"] for r in result.records)
        result.stats.update(
            {
                "quantized": len(sites),
                "kept": len(skipped),
                "outliers": sum(r["outliers"] for r in result.records),
                "weight_bytes_before": int(before),
                "weight_bytes_after": int(after),
                "calibration_batches": len(feeds),
            }
        )
        return result

    # --- kind=activation ---------------------------------------------------------------------

    def _split(self, graph: ir.Graph, site: WeightSite, stat, gathers, result) -> dict:
        weight = to_torch(site.weight.const_value)
        k, n = weight.shape
        outliers, over_cap = outlier_channels(
            stat.absmax, self.threshold, self.max_outlier_fraction
        )
        if over_cap:
            result.notes.append(
                f"{site.label}: {outliers.numel() + over_cap} input channels exceed "
                f"{self.threshold}; the {over_cap} quietest stay int8 (max-outlier-fraction)"
            )
        regular = split_rows(k, outliers)
        try:
            qw = quantize_rtn(weight[regular], INT8)
        except ValueError as err:
            raise KompaktError(f"outlier-split cannot quantize '{site.label}': {err}") from err
        approx = weight.float().clone()
        approx[regular] = qw.dequantize().float()
        x = stat.samples
        reference = x @ weight.float()
        signal = float(reference.pow(2).mean()) or 1.0
        plain = quantize_rtn(weight, INT8).dequantize().float()
        record = {
            "module": site.label,
            "shape": [k, n],
            "scheme": f"int8 per-channel sym + {outliers.numel()} float input channels",
            "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
            "bytes_after": int(
                quantized_bytes(qw, INT8) + storage_bytes(site.weight.dtype, outliers.numel() * n)
            ),
            "outliers": int(outliers.numel()),
            "output_error": round(float((x @ approx - reference).pow(2).mean()) / signal, 8),
            "int8_output_error": round(float((x @ plain - reference).pow(2).mean()) / signal, 8),
        }
        if outliers.numel() == 0:
            replace_with_dequantized(graph, site, qw, method="llm.int8")
            return record
        float_rows = constant(
            graph, weight[outliers].clone(), f"{site.weight.name or 'weight'}_outlier_rows"
        )
        int8_rows = constant(
            graph, weight[regular].clone(), f"{site.weight.name or 'weight'}_int8_rows"
        )
        int8_site = WeightSite(int8_rows)
        for matmul in site.matmuls:
            if (id(matmul.inputs[0]), tuple(outliers.tolist())) not in gathers:
                record["bytes_after"] += 8 * k  # int64 Gather indices (shared by q, k, v)
            picked = _gathers(graph, matmul, outliers, regular, gathers)
            int8_site.matmuls.append(_replace_matmul(graph, matmul, picked, float_rows, int8_rows))
        replace_with_dequantized(graph, int8_site, qw, method="llm.int8")
        if not site.weight.uses() and site.weight.name in graph.initializers:
            graph.initializers.pop(site.weight.name)
        return record

    # --- kind=weight -------------------------------------------------------------------------

    def _sparse(self, graph: ir.Graph, site: WeightSite, hessian: torch.Tensor) -> dict:
        grid = Grid(self.bits, self.group_size, self.symmetric)
        weight = to_torch(site.weight.const_value)
        k, n = weight.shape
        try:
            sq = spqr_quantize(
                weight, hessian, grid, self.outlier_fraction, self.block_size, self.damp
            )
        except ValueError as err:
            raise KompaktError(f"outlier-split cannot quantize '{site.label}': {err}") from err
        nnz = sq.index.numel()
        base = quantized_bytes(sq.base, grid)
        record = {
            "module": site.label,
            "shape": [k, n],
            "scheme": f"{grid.describe()} spqr + {nnz} float16 outliers",
            "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
            "bytes_after": int(base + (nnz * (8 + 2) + 8 + 16 if nnz else 0)),
            "outliers": int(nnz),
            "output_error": round(hessian_error(weight, sq.dequantize(), hessian), 8),
            "rtn_output_error": round(
                hessian_error(weight, quantize_rtn(weight, grid).dequantize(), hessian), 8
            ),
        }
        _emit_sparse(graph, site, sq, grid)
        return record


def _gathers(graph, matmul, outliers, regular, cache) -> tuple[ir.Value, ir.Value]:
    """Gather(x, O) and Gather(x, R), shared by the MatMuls that read the same x with the same
    split (q, k and v all see the same outlier channels)."""
    x = matmul.inputs[0]
    key = (id(x), tuple(outliers.tolist()))
    if key in cache:
        return cache[key]
    picked = []
    for rows, what in ((outliers, "outlier"), (regular, "int8")):
        index = constant(graph, rows.to(torch.int64), f"{x.name}_{what}_channels")
        node = ir.node(
            "Gather", [x, index], {"axis": -1}, name=unique_name(graph, f"{matmul.name}/{what}")
        )
        out = node.outputs[0]
        out.name = unique_name(graph, f"{x.name}_{what}_channels_out")
        out.type = x.type
        if x.shape is not None:
            out.shape = ir.Shape([*list(x.shape)[:-1], rows.numel()])
        copy_module(matmul, node)
        graph.insert_before(matmul, node)
        picked.append(out)
    cache[key] = (picked[0], picked[1])
    return cache[key]


def _replace_matmul(graph, matmul, picked, float_rows, int8_rows) -> ir.Node:
    """y = x W becomes Add(x[:, O] W[O], x[:, R] W[R]); returns the int8 MatMul."""
    old = matmul.outputs[0]
    outlier_mm = ir.node("MatMul", [picked[0], float_rows], name=f"{matmul.name}/float_part")
    int8_mm = ir.node("MatMul", [picked[1], int8_rows], name=f"{matmul.name}/int8_part")
    add = ir.node("Add", [outlier_mm.outputs[0], int8_mm.outputs[0]], name=f"{matmul.name}/sum")
    for node, suffix in ((outlier_mm, "float_part"), (int8_mm, "int8_part"), (add, "sum")):
        node.outputs[0].name = unique_name(graph, f"{old.name}_{suffix}")
        node.outputs[0].type = old.type
        node.outputs[0].shape = old.shape
    copy_module(matmul, outlier_mm, int8_mm, add)
    graph.insert_before(matmul, [outlier_mm, int8_mm, add])
    name = old.name
    ir.convenience.replace_all_uses_with(old, add.outputs[0], replace_graph_outputs=True)
    graph.remove(matmul, safe=True)
    add.outputs[0].name = name  # the split MatMul keeps its output's name
    return int8_mm


def _emit_sparse(graph: ir.Graph, site: WeightSite, sq: SparseQuantized, grid: Grid) -> None:
    """Writes W = Cast(ScatterND(DequantizeLinear(...)), ...)) in front of the site's MatMuls."""
    base_name = site.weight.name or "weight"
    k, n = sq.base.q.shape
    first = next(node for node in graph if any(node is m for m in site.matmuls))
    inputs = [
        constant(graph, sq.base.q, f"{base_name}_quantized", dtype=grid.storage_dtype),
        constant(graph, sq.base.scale, f"{base_name}_scale"),
    ]
    if sq.base.zero_point is not None:
        inputs.append(
            constant(graph, sq.base.zero_point, f"{base_name}_zero_point", dtype=grid.storage_dtype)
        )
    nodes = [
        ir.node(
            "DequantizeLinear",
            inputs,
            {"axis": 0, "block_size": grid.rows_per_group(k)},
            name=f"{site.label}/dequantize_weight",
        )
    ]
    nodes[0].metadata_props[QUANT_KEY] = json.dumps(
        {
            "bits": grid.bits,
            "group_size": grid.group_size,
            "symmetric": grid.symmetric,
            "method": "spqr",
            "outliers": int(sq.index.numel()),
        },
        sort_keys=True,
    )
    _name(graph, nodes[-1], f"{base_name}_dequantized", ir.DataType.FLOAT16, [k, n])
    if sq.index.numel():
        flat = [-1]
        shape = [k, n]
        steps = [
            ("Reshape", [constant(graph, torch.tensor(flat), f"{base_name}_flat_shape")], [k * n]),
            (
                "ScatterND",
                [
                    constant(graph, sq.index[:, None], f"{base_name}_outlier_index"),
                    constant(graph, sq.values, f"{base_name}_outlier_values"),
                ],
                [k * n],
            ),
            ("Reshape", [constant(graph, torch.tensor(shape), f"{base_name}_shape")], shape),
        ]
        for (op, extra, dims), what in zip(steps, ("flat", "with_outliers", "sparse"), strict=True):
            node = ir.node(op, [nodes[-1].outputs[0], *extra], name=f"{site.label}/{what}")
            _name(graph, node, f"{base_name}_{what}", ir.DataType.FLOAT16, dims)
            nodes.append(node)
    if site.weight.dtype != ir.DataType.FLOAT16:
        node = ir.node(
            "Cast", [nodes[-1].outputs[0]], {"to": site.weight.dtype}, name=f"{site.label}/cast"
        )
        _name(graph, node, f"{base_name}_restored", site.weight.dtype, [k, n])
        nodes.append(node)
    copy_module(site.matmuls[0], *nodes)
    graph.insert_before(first, nodes)
    for matmul in site.matmuls:
        matmul.replace_input_with(1, nodes[-1].outputs[0])
    if not site.weight.uses() and site.weight.name in graph.initializers:
        graph.initializers.pop(site.weight.name)


def _name(graph: ir.Graph, node: ir.Node, name: str, dtype: ir.DataType, dims) -> None:
    out = node.outputs[0]
    out.name = unique_name(graph, name)
    out.type = ir.TensorType(dtype)
    out.shape = ir.Shape(dims)
