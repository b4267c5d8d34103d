"""lowrank-compensation: ZeroQuant-V2's LoRC (Yao et al., 2023, sec. 5), and keep-float-weights.

LoRC needs the float weight W that a quantization pass rounded, to form E = W - Ŵ. Quantization
passes drop W from the IR; ``keep-float-weights``, placed before them, sets an in-memory flag on
the graph so that every weight DequantizeLinear they write remembers the W it replaced (in
``node.meta``, which is never serialized; see `emit.remember_float_weight`). This is the weight
as rounded, so AWQ's rescaled weight is compensated correctly too. LoRC then frees them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import constant, first_in_graph, unique_name
from kompakt.ir.metadata import copy_module, module_of
from kompakt.ir.tensors import storage_bytes, to_torch, torch_dtype
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import FLOAT_WEIGHT, KEEP_FLOAT_WEIGHTS
from kompakt.passes.quantize.lowrank_math import (
    lowrank_factors,
    quantize_factor,
    relative_error,
    resolve_rank,
)
from kompakt.passes.registry import register_pass
from kompakt.progress import progress
from kompakt.runtime.reference.registry import build_kernel

FACTOR_BITS = (8, 16)


@register_pass
@dataclass(frozen=True)
class KeepFloatWeights(Pass):
    """Make later weight quantization passes remember the float weights they replace (in memory).

    Put it before the quantization pass that lowrank-compensation follows. The float weights
    stay in memory until lowrank-compensation has used them; nothing is written to the model.

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(x, W: f32[K, N])    (unchanged; the graph carries an in-memory flag)
    """

    name: ClassVar[str] = "keep-float-weights"
    provides: ClassVar[frozenset[str]] = frozenset({"float-weights-kept"})

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        model.graph.meta[KEEP_FLOAT_WEIGHTS] = True
        return PassResult(changed=False)


@dataclass
class _Target:
    dq: ir.Node
    matmuls: list[ir.Node]
    weight: ir.TensorProtocol  # the float weight the DequantizeLinear replaced

    @property
    def label(self) -> str:
        return module_of(self.matmuls[0]) or self.dq.name or "?"


@register_pass
@dataclass(frozen=True)
class LowrankCompensation(Pass):
    """Add a low-rank correction A·B of each quantized weight's rounding error (LoRC).

    E = W - Ŵ is approximated by its truncated SVD, E ≈ U_r Σ_r V_rᵀ, as A = U_r Σ_r^½ and
    B = Σ_r^½ V_rᵀ (ZeroQuant-V2, sec. 5); the factors are stored in 8 bits, as in the paper, or
    16. Needs keep-float-weights before the quantization pass. With calibration data given, the
    records also hold each MatMul's output error before and after, on the calibration inputs;
    the SVD itself is not weighted by activations.

    Before: y = MatMul(x, DequantizeLinear(Wq, s, z))
    After:  y = Add(MatMul(x, DequantizeLinear(Wq, s, z)),
                    MatMul(MatMul(x, DequantizeLinear(A: i8[K, r], sA: f32[r], axis=1)),
                           DequantizeLinear(B: i8[r, N], sB: f32[N], axis=1)))

    Args:
        rank: Rank r of the correction: an integer >= 1 (the paper uses 8), or a fraction in
            (0, 1) of min(K, N) per weight. Capped at min(K, N).
        factor_bits: 8 (int8, one scale per column, as in the paper) or 16 (float16, cast to
            the model's float type where it differs).
        exclude: Module-path globs (or DequantizeLinear names) to leave uncompensated.
    """

    name: ClassVar[str] = "lowrank-compensation"
    requires: ClassVar[frozenset[str]] = frozenset({"weights-quantized", "float-weights-kept"})
    invalidates: ClassVar[frozenset[str]] = frozenset({"float-weights-kept"})

    rank: float = 8
    factor_bits: int = 8
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.rank > 0 or (self.rank >= 1 and self.rank != int(self.rank)):
            raise ValueError(
                f"rank must be an integer >= 1 or a fraction in (0, 1); got {self.rank}"
            )
        if self.factor_bits not in FACTOR_BITS:
            raise ValueError(f"factor_bits must be 8 or 16; got {self.factor_bits}")

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        targets, forgotten, excluded = _targets(graph, self.exclude)
        if forgotten and not targets:
            raise KompaktError(
                f"lowrank-compensation: the float weight of '{forgotten[0]}' was not kept; put "
                "'keep-float-weights' before the weight quantization pass"
            )
        result = PassResult(changed=bool(targets))
        opset = model.opset_imports.get("", 21)
        for target, x in self._with_samples(model, ctx, targets):
            record = self._compensate(graph, target, opset, x)
            if record is not None:
                result.records.append(record)
            else:
                result.notes.append(f"{target.label}: quantized exactly; nothing to compensate")
        _forget_float_weights(graph)
        result.notes += [f"{label}: float weight not kept; left as is" for label in forgotten]
        result.notes += [f"{label}: excluded by pattern" for label in excluded]
        added = sum(r["added_bytes"] for r in result.records)
        result.stats.update(
            {
                "compensated": len(result.records),
                "added_bytes": int(added),
                "weight_bytes_before": int(sum(r["bytes_before"] for r in result.records)),
            }
        )
        if result.records:
            result.stats["mean_weight_error_before"] = _mean(result.records, "weight_error_before")
            result.stats["mean_weight_error_after"] = _mean(result.records, "weight_error_after")
        return result

    def _with_samples(self, model, ctx, targets):
        """Yields (target, its MatMul's calibration input rows or None). With calibration data,
        blocks run in order, each measured with the corrections of earlier blocks in place."""
        if ctx.calibration is None or not targets:
            for target in progress(targets, self.name, enabled=ctx.progress):
                yield target, None
            return
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        runner = BlockwiseRunner(model, feeds)
        by_matmul = {id(t.matmuls[0]): t for t in targets}
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [by_matmul[id(n)] for n in stage.nodes if id(n) in by_matmul]
            if here:
                stats = stage.collect({id(t.matmuls[0].inputs[0]): {"samples"} for t in here})
                for target in here:
                    yield target, stats[id(target.matmuls[0].inputs[0])].samples

    def _compensate(self, graph, target: _Target, opset: int, x) -> dict | None:
        weight = to_torch(target.weight).float()
        if not torch.isfinite(weight).all():
            raise KompaktError(
                f"lowrank-compensation: the float weight of '{target.label}' contains NaN or Inf"
            )
        quantized = _dequantize(target.dq, opset).float()
        error = weight - quantized
        if not torch.isfinite(error).all():
            raise KompaktError(
                f"lowrank-compensation: the quantized weight of '{target.label}' is not finite"
            )
        if not bool(error.any()):
            return None
        k, n = weight.shape
        rank = resolve_rank(self.rank, k, n)
        a, b = lowrank_factors(error, rank)
        dtype = target.dq.outputs[0].dtype or ir.DataType.FLOAT
        a_value, a_used, a_bytes = self._factor(graph, target, a, "a", dtype)
        b_value, b_used, b_bytes = self._factor(graph, target, b, "b", dtype)
        for matmul in target.matmuls:
            _add_correction(graph, matmul, a_value, b_value, rank)
        compensated = quantized + a_used @ b_used
        before = _dq_bytes(target.dq)
        record = {
            "module": target.label,
            "shape": [k, n],
            "scheme": f"lorc r{rank} {'int8' if self.factor_bits == 8 else 'fp16'} factors",
            "rank": rank,
            "bytes_before": int(before),
            "bytes_after": int(before + a_bytes + b_bytes),
            "added_bytes": int(a_bytes + b_bytes),
            "weight_error_before": round(relative_error(weight, quantized), 6),
            "weight_error_after": round(relative_error(weight, compensated), 6),
        }
        if x is not None and x.numel():
            reference = x @ weight
            record["output_error_before"] = round(relative_error(reference, x @ quantized), 6)
            record["output_error_after"] = round(relative_error(reference, x @ compensated), 6)
        return record

    def _factor(self, graph, target: _Target, factor: torch.Tensor, which: str, dtype):
        """The IR value holding ``factor`` as stored, what it computes to, and its bytes."""
        first = first_in_graph(graph, target.matmuls)
        base = f"{target.dq.outputs[0].name or 'weight'}_lorc_{which}"
        if self.factor_bits == 8:
            qf = quantize_factor(factor)
            q = constant(graph, qf.q, f"{base}_quantized", dtype=ir.DataType.INT8)
            scale_dtype = torch_dtype(dtype)
            scale = constant(graph, qf.scale[0].to(scale_dtype), f"{base}_scale")
            node = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 1})
            used = qf.dequantize().float().to(scale_dtype).float()
            stored = storage_bytes(ir.DataType.INT8, qf.q.numel()) + storage_bytes(
                dtype, qf.scale.numel()
            )
        else:
            half = factor.to(torch.float16)
            value = constant(graph, half, base)
            used = half.float().to(torch_dtype(dtype)).float()
            stored = storage_bytes(ir.DataType.FLOAT16, half.numel())
            if dtype == ir.DataType.FLOAT16:
                return value, used, stored
            node = ir.node("Cast", [value], attributes={"to": dtype})
        node.name = f"{target.label}/lorc_{which}"
        copy_module(target.matmuls[0], node)
        out = node.outputs[0]
        out.name = unique_name(graph, base + ("_dequantized" if self.factor_bits == 8 else "_cast"))
        out.type, out.shape = ir.TensorType(dtype), ir.Shape(list(factor.shape))
        graph.insert_before(first, node)
        return out, used, stored


def _targets(graph: ir.Graph, exclude) -> tuple[list[_Target], list[str], list[str]]:
    """Weight DequantizeLinears feeding MatMuls: those with a kept float weight, the labels of
    those without, and the labels excluded by pattern."""
    targets, forgotten, excluded = [], [], []
    for node in graph:
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            continue
        if node.inputs[0] is None or node.inputs[0].const_value is None:
            continue  # an activation's Q/DQ, not a weight
        uses = node.outputs[0].uses()
        if not uses or any(u.node.op_type != "MatMul" or u.idx != 1 for u in uses):
            continue
        matmuls = [u.node for u in uses]
        target = _Target(node, matmuls, node.meta.get(FLOAT_WEIGHT))
        names = {node.name or ""} | {module_of(m) for m in matmuls}
        if any(fnmatch.fnmatchcase(name, p) for p in exclude for name in names if name):
            excluded.append(target.label)
        elif target.weight is None:
            forgotten.append(target.label)
        else:
            targets.append(target)
    return targets, forgotten, excluded


def _dequantize(dq: ir.Node, opset: int) -> torch.Tensor:
    """Ŵ as the reference runtime computes it (any DequantizeLinear form, float8 included)."""
    args = [None if v is None else to_torch(v.const_value) for v in dq.inputs]
    return build_kernel(dq, dq.version or opset)(*args)


def _dq_bytes(dq: ir.Node) -> float:
    return sum(
        storage_bytes(v.dtype, v.const_value.size)
        for v in dq.inputs
        if v is not None and v.const_value is not None
    )


def _add_correction(graph, matmul: ir.Node, a: ir.Value, b: ir.Value, rank: int) -> None:
    """y = MatMul(x, W) becomes Add(y, MatMul(MatMul(x, A), B)); y's users read the sum."""
    x, y = matmul.inputs[0], matmul.outputs[0]
    uses = list(y.uses())
    project = ir.node("MatMul", [x, a], name=f"{matmul.name}/lorc_project")
    expand = ir.node("MatMul", [project.outputs[0], b], name=f"{matmul.name}/lorc_expand")
    add = ir.node("Add", [y, expand.outputs[0]], name=f"{matmul.name}/lorc_add")
    copy_module(matmul, project, expand, add)
    base = y.name or "matmul"
    for node, suffix in ((project, "lorc_projected"), (expand, "lorc_correction")):
        node.outputs[0].name = unique_name(graph, f"{base}_{suffix}")
        node.outputs[0].type = y.type
    if x.shape is not None:
        project.outputs[0].shape = ir.Shape([*x.shape[:-1], rank])
    expand.outputs[0].shape = y.shape
    total = add.outputs[0]
    total.type, total.shape = y.type, y.shape
    graph.insert_after(matmul, [project, expand, add])
    for use in uses:
        use.node.replace_input_with(use.idx, total)
    if y.is_graph_output():  # the graph's output keeps its name; the partial sum is renamed
        name = y.name
        y.name = unique_name(graph, f"{name}_quantized_part")
        total.name = name
        for index, value in enumerate(graph.outputs):
            if value is y:
                graph.outputs[index] = total
    else:
        total.name = unique_name(graph, f"{base}_compensated")


def _forget_float_weights(graph: ir.Graph) -> None:
    """Frees the kept float weights and stops keeping new ones."""
    graph.meta.pop(KEEP_FLOAT_WEIGHTS, None)
    for node in graph:
        node.meta.pop(FLOAT_WEIGHT, None)


def _mean(records: list[dict], key: str) -> float:
    return round(sum(r[key] for r in records) / len(records), 6)
