"""fp8: float8 E4M3 weights and activations (Micikevicius et al., 2022, "FP8 Formats for Deep
Learning"; the W8A8-FP8 scheme used for inference on H100-class GPUs).

Written as standard ONNX (opset >= 19 for float8 QuantizeLinear, 21 for the per-token blocks).
Measured with onnxruntime 1.31 on CPU: float8 QuantizeLinear/DequantizeLinear have kernels and
run exactly as the reference runtime does, but at ORT_ENABLE_EXTENDED and above ORT's QDQ fusion
turns a float8 Q/DQ activation and a float8 weight DequantizeLinear into MatMulIntegerToFloat,
which rejects float8 (INVALID_GRAPH at session creation). A session made with the config entry
``session.disable_quant_qdq = 1`` runs it. Weight-only fp8 runs at any level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar, Literal

import onnx_ir as ir
import torch

from kompakt.errors import KompaktError
from kompakt.ir.builder import constant, first_in_graph
from kompakt.ir.metadata import copy_module, module_of, set_module
from kompakt.ir.tensors import storage_bytes, to_torch, torch_dtype
from kompakt.passes.base import CompileContext, Pass, PassResult
from kompakt.passes.calibrate.batches import calibration_feeds
from kompakt.passes.calibrate.blockwise import BlockwiseRunner
from kompakt.passes.quantize.emit import QUANT_KEY, remember_float_weight
from kompakt.passes.quantize.fp8_math import (
    E4M3_MAX,
    e4m3_scale,
    fake_quantize,
    to_e4m3,
    weight_scale,
)
from kompakt.passes.quantize.grid import sqnr_db
from kompakt.passes.quantize.layers import WeightSite, select_weights
from kompakt.passes.quantize.lowrank_math import relative_error
from kompakt.passes.registry import register_pass
from kompakt.progress import progress

FP8 = ir.DataType.FLOAT8E4M3FN
FP8_ACT_KEY = "kompakt.fp8_act"
"""Activation DequantizeLinear metadata: JSON with format and granularity."""
WEIGHT_SCALES = ("tensor", "channel")


@register_pass
@dataclass(frozen=True)
class Fp8(Pass):
    """Quantize MatMul weights, and their inputs, to float8 E4M3 (max |value| mapped to 448).

    Static activation scales are one per tensor, max|x| / 448 over the calibration data,
    measured block by block on the model as it is then (earlier blocks already in fp8). Dynamic
    ones are one per token, computed at run time; they need no calibration data.

    Before: y = MatMul(x, W: f32[K, N])
    After:  y = MatMul(DequantizeLinear(QuantizeLinear(x, s_x, 0: f8e4m3fn), s_x, 0: f8e4m3fn),
                       DequantizeLinear(Wq: f8e4m3fn[K, N], s_w: f32[N], axis=1))
            static: s_x f32 scalar constant; dynamic: s_x = max(ReduceMax(|x|, -1) / 448, tiny)
            with QuantizeLinear/DequantizeLinear(axis=-1, block_size=K)

    Args:
        weight_scale: "channel" (one scale per output channel) or "tensor" (one per weight).
        activations: Also quantize the MatMul inputs; false gives fp8 weight-only.
        dynamic: Per-token activation scales computed at run time instead of calibrated
            per-tensor ones.
        exclude: Module-path globs (or weight names) to leave in float.
        keep_lm_head: Leave the output projection (lm_head) in float.
    """

    name: ClassVar[str] = "fp8"
    requires: ClassVar[frozenset[str]] = frozenset({"canonical"})
    provides: ClassVar[frozenset[str]] = frozenset({"weights-quantized"})

    weight_scale: Literal["tensor", "channel"] = "channel"
    activations: bool = True
    dynamic: bool = False
    exclude: tuple[str, ...] = ()
    keep_lm_head: bool = True

    def __post_init__(self) -> None:
        if self.weight_scale not in WEIGHT_SCALES:
            raise ValueError(
                f"weight_scale must be 'tensor' or 'channel'; got {self.weight_scale!r}"
            )
        for option in ("activations", "dynamic", "keep_lm_head"):
            if not isinstance(getattr(self, option), bool):
                raise ValueError(f"{option} must be true or false; got {getattr(self, option)!r}")

    @property
    def uses_calibration(self) -> bool:  # type: ignore[override]
        """Only static activation scales are measured on data."""
        return self.activations and not self.dynamic

    def run(self, model: ir.Model, ctx: CompileContext) -> PassResult:
        graph = model.graph
        opset = model.opset_imports.get("", 0)
        needed = 21 if self.activations and self.dynamic else 19
        if opset < needed:
            raise KompaktError(f"fp8 needs opset >= {needed} (float8 QuantizeLinear); got {opset}")
        sites, skipped = select_weights(graph, self.exclude, self.keep_lm_head)
        result = PassResult(changed=bool(sites))
        if self.uses_calibration:
            self._static(model, ctx, sites, result)
        else:
            for site in progress(sites, self.name, enabled=ctx.progress):
                result.records.append(self._weight(graph, site)[0])
            if self.activations:
                for matmuls in _by_input(sites).values():
                    _insert_dynamic_qdq(graph, matmuls[0].inputs[0], matmuls, _k(matmuls[0]))
        result.notes += [f"{s.label}: kept in float ({s.reason})" for s in skipped]
        result.stats.update(
            {
                "quantized": len(sites),
                "kept": len(skipped),
                "weight_bytes_before": int(sum(r["bytes_before"] for r in result.records)),
                "weight_bytes_after": int(sum(r["bytes_after"] for r in result.records)),
            }
        )
        if self.activations:
            result.stats["activations"] = "dynamic per-token" if self.dynamic else "static"
        return result

    def _static(self, model, ctx, sites: list[WeightSite], result: PassResult) -> None:
        feeds = calibration_feeds(model, ctx.calibration, self.name)
        runner = BlockwiseRunner(model, feeds)
        pending = {id(m): site for site in sites for m in site.matmuls}
        for stage in progress(
            runner.stages(), self.name, enabled=ctx.progress, total=runner.num_stages()
        ):
            here = [n for n in stage.nodes if id(n) in pending]
            if not here:
                continue
            inputs = _by_input_of(here)
            stats = stage.collect({key: {"absmax", "samples"} for key in inputs})
            for key, matmuls in inputs.items():
                x = matmuls[0].inputs[0]
                amax = stats[key].absmax.max()
                scale = float(e4m3_scale(amax))
                samples = fake_quantize(stats[key].samples, torch.tensor(scale))
                for matmul in matmuls:
                    site = pending.pop(id(matmul), None)
                    if site is None:
                        continue  # its weight was quantized with an earlier MatMul of the site
                    for other in site.matmuls:
                        pending.pop(id(other), None)
                    record, weight, dequantized = self._weight(model.graph, site)
                    record["activation_scale"] = scale
                    if samples.numel():  # relative error of this MatMul on calibration rows
                        record["output_error"] = round(
                            relative_error(stats[key].samples @ weight, samples @ dequantized), 6
                        )
                    result.records.append(record)
                _insert_static_qdq(model.graph, x, matmuls, scale)

    def _weight(self, graph: ir.Graph, site: WeightSite):
        """Replaces the site's weight by DequantizeLinear(fp8 codes, scale). Returns its record,
        the float weight and the dequantized one (float32)."""
        weight = to_torch(site.weight.const_value)
        if not torch.isfinite(weight).all():
            raise KompaktError(f"cannot quantize weight of '{site.label}' to fp8: NaN or Inf")
        per_channel = self.weight_scale == "channel"
        scale = weight_scale(weight, per_channel)
        codes = to_e4m3(weight, scale)
        float_type = torch_dtype(site.weight.dtype)
        stored_scale = scale.to(float_type)
        base = site.weight.name or "weight"
        q = constant(graph, codes, f"{base}_fp8", dtype=FP8)
        s = constant(graph, stored_scale, f"{base}_scale")
        dq = ir.node(
            "DequantizeLinear",
            [q, s],
            attributes={"axis": 1} if per_channel else {},
            name=f"{site.label}/dequantize_weight",
        )
        set_module(dq, site.module)
        dq.metadata_props[QUANT_KEY] = json.dumps(
            {
                "bits": 8,
                "format": "float8e4m3fn",
                "granularity": self.weight_scale,
                "method": "fp8",
            },
            sort_keys=True,
        )
        remember_float_weight(graph, dq, site.weight.const_value)
        out = dq.outputs[0]
        out.name = f"{base}_dequantized"
        out.type, out.shape = site.weight.type, site.weight.shape
        graph.insert_before(first_in_graph(graph, site.matmuls), dq)
        for matmul in site.matmuls:
            matmul.replace_input_with(1, out)
        if not site.weight.uses() and site.weight.name in graph.initializers:
            graph.initializers.pop(site.weight.name)
        k, n = weight.shape
        dequantized = codes.float() * stored_scale.float()
        record = {
            "module": site.label,
            "shape": [k, n],
            "scheme": f"fp8 e4m3 per-{self.weight_scale}" + self._activation_scheme(),
            "bytes_before": int(storage_bytes(site.weight.dtype, k * n)),
            "bytes_after": int(
                storage_bytes(FP8, k * n) + storage_bytes(site.weight.dtype, stored_scale.numel())
            ),
            "sqnr_db": round(sqnr_db(weight, dequantized), 2),
        }
        return record, weight.float(), dequantized

    def _activation_scheme(self) -> str:
        if not self.activations:
            return ", float inputs"
        return ", inputs fp8 " + ("per-token dynamic" if self.dynamic else "per-tensor static")


def _k(matmul: ir.Node) -> int:
    return int(matmul.inputs[1].producer().inputs[0].const_value.shape[0])


def _by_input(sites: list[WeightSite]) -> dict[int, list[ir.Node]]:
    return _by_input_of([m for site in sites for m in site.matmuls])


def _by_input_of(matmuls: list[ir.Node]) -> dict[int, list[ir.Node]]:
    """MatMuls grouped by the activation they read: q/k/v share one quantized input."""
    groups: dict[int, list[ir.Node]] = {}
    for matmul in matmuls:
        groups.setdefault(id(matmul.inputs[0]), []).append(matmul)
    return groups


def _insert_static_qdq(graph, x: ir.Value, matmuls: list[ir.Node], scale: float) -> None:
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    base = x.name or "activation"
    s = constant(graph, torch.tensor(scale, dtype=torch_dtype(dtype)), f"{base}_fp8_scale")
    zero = constant(
        graph, torch.zeros((), dtype=torch.float8_e4m3fn), f"{base}_fp8_zero_point", dtype=FP8
    )
    quantize = ir.node("QuantizeLinear", [x, s, zero])
    dequantize = ir.node("DequantizeLinear", [quantize.outputs[0], s, zero])
    _wire(graph, x, matmuls, [quantize, dequantize], "per-tensor static")


def _insert_dynamic_qdq(graph, x: ir.Value, matmuls: list[ir.Node], k: int) -> None:
    """s = max(ReduceMax(|x|, -1) / 448, tiny) per token, then blocked Q/DQ along the last axis."""
    dtype = x.dtype if x.dtype is not None else ir.DataType.FLOAT
    torch_type = torch_dtype(dtype)
    base = x.name or "activation"
    axes = constant(graph, torch.tensor([-1], dtype=torch.int64), f"{base}_token_axis")
    top_value = constant(graph, torch.tensor(E4M3_MAX, dtype=torch_type), f"{base}_fp8_max")
    # The floor keeps an all-zero token's scale positive (0 / 0 would be NaN).
    floor = constant(graph, torch.tensor(torch.finfo(torch_type).tiny), f"{base}_scale_floor")
    absolute = ir.node("Abs", [x])
    top = ir.node("ReduceMax", [absolute.outputs[0], axes], attributes={"keepdims": 1})
    ratio = ir.node("Div", [top.outputs[0], top_value])
    scale = ir.node("Max", [ratio.outputs[0], floor])
    blocked = {"axis": -1, "block_size": k}
    quantize = ir.node(
        "QuantizeLinear", [x, scale.outputs[0]], attributes={**blocked, "output_dtype": int(FP8)}
    )
    dequantize = ir.node(
        "DequantizeLinear", [quantize.outputs[0], scale.outputs[0]], attributes=blocked
    )
    token_shape = None if x.shape is None else ir.Shape([*list(x.shape)[:-1], 1])
    for node, shape, suffix in (
        (absolute, x.shape, "abs"),
        (top, token_shape, "absmax"),
        (ratio, token_shape, "ratio"),
        (scale, token_shape, "fp8_scale"),
    ):
        node.outputs[0].name = f"{base}_{suffix}"
        node.outputs[0].type, node.outputs[0].shape = x.type, shape
    _wire(graph, x, matmuls, [absolute, top, ratio, scale, quantize, dequantize], "per-token")


def _wire(graph, x: ir.Value, matmuls, nodes: list[ir.Node], granularity: str) -> None:
    """Inserts ``nodes`` (ending in Q, DQ) before the first MatMul and feeds the MatMuls from the
    DequantizeLinear; other readers of x (a residual Add) keep the float value."""
    quantize, dequantize = nodes[-2], nodes[-1]
    label = module_of(matmuls[0]) or matmuls[0].name or "matmul"
    quantize.name, dequantize.name = f"{label}/quantize_input", f"{label}/dequantize_input"
    for node in nodes[:-2]:
        node.name = f"{label}/input_{node.op_type.lower()}"
    base = x.name or "activation"
    quantize.outputs[0].name = f"{base}_fp8"
    quantize.outputs[0].type, quantize.outputs[0].shape = ir.TensorType(FP8), x.shape
    dequantize.outputs[0].name = f"{base}_fp8_dequantized"
    dequantize.outputs[0].type, dequantize.outputs[0].shape = x.type, x.shape
    dequantize.metadata_props[FP8_ACT_KEY] = json.dumps(
        {"format": "float8e4m3fn", "granularity": granularity}, sort_keys=True
    )
    copy_module(matmuls[0], *nodes)
    first = first_in_graph(graph, matmuls)
    for node in nodes:
        graph.insert_before(first, node)
    for matmul in matmuls:
        matmul.replace_input_with(0, dequantize.outputs[0])
