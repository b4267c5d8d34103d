"""codebook: non-uniform weight quantization with per-channel lookup tables (SqueezeLLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import constant, unique_name
from kompakt.ir.metadata import set_module
from kompakt.ir.tensors import storage_bytes, to_torch
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.cleanup.fold_constants import KEEP_UNFOLDED_KEY
from kompakt.passes.quantize.codebook_math import lookup, sensitivities, weighted_kmeans
from kompakt.passes.quantize.emit import QUANT_KEY
from kompakt.passes.quantize.gptq_math import hessian_error
from kompakt.passes.quantize.grid import Grid, quantize_rtn, sqnr_db
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.registry import register_pass
from kompakt.progress import progress

BITS = (2, 3, 4, 8)
"""Metadata on every node that rebuilds a weight from its codebook: all their inputs are
constants, so fold-constants would otherwise write the float weight (or int64 indices) back."""
SHAPE_BYTES = 3 * 8
"""The two int64 shapes (flat [-1], and [K, N]) the sparse part's Reshapes read."""
MAX_OUTLIERS = 0.1
"""Past a tenth of the entries, a sparse part costs more than a finer codebook would."""
FLOAT16_MAX = 65504.0


@register_pass
@dataclass(frozen=True)
class Codebook(Pass):
    """Quantize MatMul weights to a per-output-channel codebook of 2^bits values, chosen by a
    sensitivity-weighted k-means (SqueezeLLM, Kim et al., 2023, sec. 3-4).

    The k-means weighs each weight by the diagonal of the calibration inputs' Hessian,
    H_kk = E[x_k²], a second-order proxy for the paper's Fisher diagonal, which needs gradients
    a compiler pass does not have (see codebook_math). Runs block by block, so each block's
    inputs are measured as produced by the blocks already quantized. The codebook is stored in
    float16 (as in the paper), the indices in uint4 (bits <= 4) or uint8; ONNX Runtime runs the
    lookup as a GatherElements (not fused into the MatMul: the float weight is rebuilt per run).

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(x, GatherElements(Cast(codebook: f16[2^b, N], to=f32),
                                         Cast(indices: u4[K, N], to=int64), axis=0))
    With outliers, the lookup's output W_d then goes through
            Reshape(ScatterElements(Reshape(W_d, [-1]), positions: i32[M], values: f32[M]), [K, N])

    Args:
        bits: Bits per weight (2^bits codebook entries per output channel): 2, 3, 4 or 8.
        iterations: Most Lloyd iterations of the k-means (it stops earlier once converged).
        outliers: Fraction of each weight's entries, the largest in magnitude, kept exactly in a
            sparse part (SqueezeLLM's dense-and-sparse split, sec. 4; the paper keeps 0.05-0.45%)
            and left out of the k-means; written as a ScatterElements of int32 flat positions
            and values in the weight's dtype (8 bytes per f32 entry). 0 turns it off.
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
        only: Module-path globs: quantize only these weights (per-layer overrides); empty = all.
    """

    name: ClassVar[str] = "codebook"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})
    uses_calibration: ClassVar[bool] = True

    bits: int = 3
    iterations: int = 30
    outliers: float = 0.0
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}; got {self.bits}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0; got {self.iterations}")
        if not 0 <= self.outliers <= MAX_OUTLIERS:
            raise ValueError(f"outliers must be in [0, {MAX_OUTLIERS}]; got {self.outliers}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        sites, skipped = select_weights(model.graph, self.exclude, self.keep_lm_head, self.only)
        result = PassResult(changed=bool(sites))
        pending = {id(site.matmuls[0]): site for site in sites}
        runner = BlockwiseRunner(model, feeds)
        for stage in progress(
            runner.stages() if sites else (),
            self.name,
            enabled=ctx.progress,
            total=runner.num_stages(),
        ):
            here = [pending.pop(id(n)) for n in stage.nodes if id(n) in pending]
            if not here:
                continue
            stats = stage.collect({id(site.matmuls[0].inputs[0]): {"hessian"} for site in here})
            for site in here:
                hessian = stats[id(site.matmuls[0].inputs[0])].hessian
                result.records.append(self._quantize(model.graph, site, hessian))
            del stats
            if not pending:
                break  # the remaining stages hold nothing to quantize
        before = sum(r["bytes_before"] for r in result.records)
        after = sum(r["bytes_after"] for r in result.records)
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        result.stats.update(
            {
                "quantized": len(sites),
                "kept": len(skipped),
                "weight_bytes_before": before,
                "weight_bytes_after": after,
                "calibration_batches": len(feeds),
                "calibration_tokens": sum(next(iter(f.values())).numel() for f in feeds),
            }
        )
        return result

    def _quantize(self, graph: ir.Graph, site: WeightSite, hessian: torch.Tensor) -> dict:
        weight = to_torch(site.weight.const_value)
        k, n = weight.shape
        try:
            positions = _outlier_positions(weight, self.outliers)
            excluded = None
            if positions is not None:
                excluded = torch.zeros(k * n, dtype=torch.bool)
                excluded[positions.long()] = True
                excluded = excluded.view(k, n)
            sensitivity = sensitivities(torch.diagonal(hessian))
            codebook, indices = weighted_kmeans(
                weight, sensitivity, self.bits, self.iterations, exclude=excluded
            )
        except ValueError as err:
            raise KompaktError(f"codebook cannot quantize '{site.label}': {err}") from err
        table_dtype = _table_dtype(site.weight.dtype, codebook)
        stored = codebook.to(_torch_float(table_dtype))
        approx = lookup(stored.float(), indices).to(weight.dtype)
        index_dtype = ir.DataType.UINT4 if self.bits <= 4 else ir.DataType.UINT8
        bytes_after = storage_bytes(index_dtype, k * n) + storage_bytes(table_dtype, stored.numel())
        sparse = None
        if positions is not None:
            sparse = (positions, weight.reshape(-1)[positions.long()])
            approx.view(-1)[positions.long()] = sparse[1]
            bytes_after += positions.numel() * 4 + storage_bytes(site.weight.dtype, len(sparse[1]))
            bytes_after += SHAPE_BYTES
        rtn = quantize_rtn(weight, Grid(self.bits, -1, False)).dequantize()
        record = {
            "module": site.label,
            "shape": [k, n],
            "scheme": f"codebook w{self.bits} per-channel {table_dtype.name.lower()} table"
            + ("" if sparse is None else f" + {self.outliers:.2%} sparse"),
            "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
            "bytes_after": int(bytes_after),
            "output_error": round(hessian_error(weight, approx, hessian), 6),
            "rtn_output_error": round(hessian_error(weight, rtn, hessian), 6),  # w{bits} per-ch.
            "sqnr_db": round(sqnr_db(weight, approx), 2),
            "outliers": 0 if positions is None else positions.numel(),
        }
        _emit_lookup(graph, site, stored, indices, table_dtype, index_dtype, self.bits, sparse)
        return record


def _outlier_positions(weight: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Flat positions (int32, ascending) of the ``fraction`` largest-magnitude entries."""
    count = round(fraction * weight.numel())
    if count == 0:
        return None
    if weight.numel() >= 2**31:
        raise ValueError("outliers need int32 positions: the weight has 2^31 entries or more")
    positions = weight.abs().reshape(-1).float().topk(count).indices
    return positions.sort().values.to(torch.int32)


def _table_dtype(weight_dtype: ir.DataType, codebook: torch.Tensor) -> ir.DataType:
    """float16, as SqueezeLLM stores its tables, unless the weight is bfloat16 or a value would
    overflow float16."""
    if weight_dtype == ir.DataType.BFLOAT16:
        return weight_dtype
    if codebook.numel() and float(codebook.abs().max()) > FLOAT16_MAX:
        return weight_dtype
    return ir.DataType.FLOAT16


def _torch_float(dtype: ir.DataType) -> torch.dtype:
    return {
        ir.DataType.FLOAT: torch.float32,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16,
    }[dtype]


def _emit_lookup(
    graph: ir.Graph,
    site: WeightSite,
    codebook: torch.Tensor,
    indices: torch.Tensor,
    table_dtype: ir.DataType,
    index_dtype: ir.DataType,
    bits: int,
    sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> ir.Node:
    """Feeds the site's MatMuls from GatherElements(codebook, indices); drops the float weight."""
    base = site.weight.name or "weight"
    table = constant(graph, codebook, f"{base}_codebook", dtype=table_dtype)
    packed = constant(graph, indices, f"{base}_codebook_indices", dtype=index_dtype)
    # ONNX gathers take int32/int64 indices only; the cast is what keeps the stored ones 4-bit
    widen = _node(graph, site, "widen_indices", "Cast", [packed], {"to": ir.DataType.INT64})
    widen.outputs[0].type = ir.TensorType(ir.DataType.INT64)
    widen.outputs[0].shape = site.weight.shape
    nodes = [widen]
    if table_dtype != site.weight.dtype:
        # casting the small table, not the gathered [K, N] weight
        cast = _node(graph, site, "cast_codebook", "Cast", [table], {"to": site.weight.dtype})
        nodes.append(cast)
        table = cast.outputs[0]
        table.type, table.shape = site.weight.type, ir.Shape(codebook.shape)
    gather = _node(
        graph, site, "lookup_weight", "GatherElements", [table, widen.outputs[0]], {"axis": 0}
    )
    nodes.append(gather)
    gather.metadata_props[QUANT_KEY] = json.dumps(
        {
            "bits": bits,
            "group_size": -1,
            "symmetric": False,
            "method": "codebook",
            "table_dtype": table_dtype.name.lower(),
            "outliers": 0 if sparse is None else len(sparse[0]),
        },
        sort_keys=True,
    )
    out = gather.outputs[0]
    out.type, out.shape = site.weight.type, site.weight.shape
    if sparse is not None:
        nodes += _scatter_outliers(graph, site, out, *sparse)
        out = nodes[-1].outputs[0]
    out.name = unique_name(graph, f"{base}_dequantized")
    out.type = site.weight.type
    out.shape = site.weight.shape
    first = next(n for n in graph if id(n) in {id(m) for m in site.matmuls})
    graph.insert_before(first, nodes)
    for matmul in site.matmuls:
        matmul.replace_input_with(1, out)
    if not site.weight.uses() and site.weight.name in graph.initializers:
        graph.initializers.pop(site.weight.name)
    return gather


def _scatter_outliers(
    graph: ir.Graph, site: WeightSite, dense: ir.Value, positions, values
) -> list[ir.Node]:
    """W = Reshape(ScatterElements(Reshape(dense, [-1]), positions, values), [K, N])."""
    base = site.weight.name or "weight"
    k, n = site.weight.const_value.shape
    flat_shape = constant(graph, torch.tensor([-1]), f"{base}_flat_shape")
    shape = constant(graph, torch.tensor([k, n]), f"{base}_shape")
    where = constant(graph, positions, f"{base}_outlier_positions")
    exact = constant(graph, values, f"{base}_outlier_values", dtype=site.weight.dtype)
    flatten = _node(graph, site, "flatten_weight", "Reshape", [dense, flat_shape], {})
    scatter = _node(
        graph,
        site,
        "restore_outliers",
        "ScatterElements",
        [flatten.outputs[0], where, exact],
        {"axis": 0},
    )
    restore = _node(graph, site, "reshape_weight", "Reshape", [scatter.outputs[0], shape], {})
    for node in (flatten, scatter):
        node.outputs[0].type, node.outputs[0].shape = site.weight.type, ir.Shape([k * n])
    return [flatten, scatter, restore]


def _node(graph, site: WeightSite, role: str, op: str, inputs, attributes) -> ir.Node:
    node = ir.node(op, inputs, attributes=attributes, name=f"{site.label}/{role}")
    set_module(node, site.module)
    node.metadata_props[KEEP_UNFOLDED_KEY] = "codebook"
    node.outputs[0].name = unique_name(graph, f"{site.weight.name or 'weight'}_{role}")
    return node
